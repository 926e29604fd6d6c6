"""The runtime decoder: a Llama-family model on lmq's kernels, reading a paged KV cache.

One forward computes a step's packed tokens `input_ids [T]` (spans of several sequences, see
`lmq.engine.scheduler`) through every layer:

    residual = embed[input_ids]                                              [T, C]
    per layer:
        h, residual = rms_norm(x, w_in, residual)      fused add + RMSNorm  [T, C]
        q | k | v  = h @ W_qkv^T (+ b_qkv)             one fused W4A16 linear [T, (H + 2 H_kv) D]
        (q, k = rms_norm per head: Qwen3)               then RoPE in place (at M = 1 on the GPU,
                                                        in the qkv GEMV's epilogue instead)
        write k, v into the cache; o = attention(q, cache)                   [T, H, D]
        h, residual = rms_norm(o @ W_o^T, w_post, residual)
        x = silu_mul(h @ W_gate_up^T) @ W_down^T        fused gate|up linear, fused SiLU * up
    logits = rms_norm(x, w_final, residual)[rows] @ W_head^T                 [S, V] fp32
                                                        (W_head in int8 rows with `lm_head="int8"`)

Two backends compute the same function:
- "triton" (CUDA): 4-bit weights in the `planes64` layout through the W4A16 dispatcher
  (`lmq.engine.qlinear`), the fused RMSNorm / SiLU*mul / RoPE / KV-write kernels and the paged
  prefill and decode attention kernels;
- "torch" (any device, the CPU default): the plain-PyTorch `_ref` twin of every kernel, with the
  weights dequantized once at load. Tests and CI run the real engine (scheduler, cache, prefix
  reuse) this way.
Embeddings and lm_head stay in fp16/bf16 (fp32 on the torch backend on CPU). `lm_head="int8"` quantizes the head
at load, one scale per row (`lmq.kernels.w8a16_gemm`: half the bytes of the largest read of a batch-1 decode step;
the torch backend computes with the same int8 rows, dequantized).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmq.console import log, progress
from lmq.engine.kv_cache import AttentionBatch, KVCache
from lmq.engine.qlinear import engine_table, local_arch, qlinear, qlinear_rope
from lmq.errors import InputError, UnsupportedError
from lmq.format.source import WeightSource, resolve_model_path
from lmq.kernels import rmsnorm, rope, silu_mul
from lmq.kernels.w4a16_gemm import check_bf16_support
from lmq.kernels.w4a16_gemv import can_fuse_rope
from lmq.kernels.w8a16_gemm import MIN_N, w8a16_matmul
from lmq.models.llama import ModelConfig
from lmq.quant.rows import check_lm_head, fake_quantize_rows, quantize_rows


@dataclass
class Linear:
    """One (possibly fused) 4-bit linear `x [T, K] -> [T, N]`.

    Triton backend: `qweight [K/64, N, 16]`, `scales`/`zeros [K/G, N]` (planes64) and the arch's
    dispatch table; torch backend: `weight [N, K]` dequantized. Fusing concatenates outputs (N).
    """

    qweight: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    group_size: int
    table: dict | None
    descs: dict = field(default_factory=dict, repr=False, compare=False)  # the prefill GEMM's TMA descriptors (qlinear)


def fuse_linears(parts: list[dict[str, torch.Tensor]], biases: list[torch.Tensor] | None, group_size: int,
                 backend: str, dtype: torch.dtype, device: torch.device, table: dict | None) -> Linear:
    """planes64 tensors of linears that read the same input -> one Linear with their outputs side by side."""
    bias = torch.cat(biases).to(device, dtype) if biases else None
    qweight = torch.cat([p["qweight"] for p in parts], dim=1)  # [K/64, sum N, 16]
    scales = torch.cat([p["scales"] for p in parts], dim=1)  # [K/G, sum N]
    zeros = torch.cat([p["zeros"] for p in parts], dim=1)  # [K/G, sum N]
    if backend == "torch":
        from lmq.kernels.w4a16_dequant import w4a16_dequant_ref

        weight = w4a16_dequant_ref(qweight, scales, zeros, group_size, torch.float32).to(device, dtype)  # [N, K]
        return Linear(None, None, None, weight, bias, group_size, None)
    return Linear(qweight.to(device), scales.to(device), zeros.to(device), None, bias, group_size, table)


@dataclass
class Layer:
    input_norm: torch.Tensor  # [C]
    post_norm: torch.Tensor  # [C]
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    q_norm: torch.Tensor | None  # [D] (Qwen3)
    k_norm: torch.Tensor | None


def _pick_dtype(src: WeightSource, device: torch.device, backend: str, dtype: str | None) -> torch.dtype:
    if dtype not in (None, "auto"):
        table = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in table:
            raise InputError(f"--dtype {dtype!r}: expected auto, float16 or bfloat16")
        return table[dtype]
    if backend == "torch" and device.type == "cpu":
        return torch.float32  # CPUs run fp16 matmuls slowly and inexactly
    return torch.bfloat16 if src.source_dtype() == torch.bfloat16 else torch.float16


def _resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> triton on a CUDA device, torch elsewhere; anything else is checked against the device."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend not in ("triton", "torch"):
        raise InputError(f"backend {backend!r}: expected auto, triton or torch")
    if backend == "triton" and device.type != "cuda":
        raise UnsupportedError("the triton backend runs on a CUDA GPU; on CPU use the torch backend")
    return backend


class EngineModel:
    """All weights of a 4-bit checkpoint on one device, and the forward of one engine step."""

    def __init__(self, path: str | Path | WeightSource, device: torch.device, backend: str = "auto",
                 dtype: str | None = None, deterministic: bool = False, lm_head: str = "auto"):
        from lmq.pack.api import load_linears

        check_lm_head(lm_head)  # before minutes of loading
        self.device, self.deterministic = device, deterministic
        self.backend = backend = _resolve_backend(backend, device)
        self.src = src = path if isinstance(path, WeightSource) else WeightSource(resolve_model_path(str(path)))
        self.cfg: ModelConfig = src.cfg  # an unsupported model is refused first
        if src.quant is None:
            raise InputError(f"{src.path} is not a 4-bit checkpoint (no quantization_config); make one first: "
                             f"lmq quantize {src.path} -o {src.path.name}-awq")
        src.check_shapes()
        self.dtype = _pick_dtype(src, device, backend, dtype)
        if backend == "triton":
            self.arch = local_arch(device)
            if self.dtype == torch.bfloat16:
                check_bf16_support(torch.empty(0, dtype=self.dtype, device=device), "the engine")
        else:  # the reference path reads whatever layout the checkpoint was packed in
            self.arch = (src.manifest or {}).get("arch") if src.packed is not None else "sm80"
        G, lin = load_linears(src, self.arch)  # through the same open shards
        self.group_size = G
        table = engine_table(self.arch, deterministic, self.dtype, G) if backend == "triton" else None
        cfg, arch = self.cfg, self.cfg.arch
        dt, dev = self.dtype, device
        self.layers: list[Layer] = []
        with progress(transient=True) as bar:
            task = bar.add_task(f"loading {src.path.name}", total=cfg.num_layers, info="")
            for i in range(cfg.num_layers):
                self.layers.append(self._load_layer(src, lin, i, G, table))
                bar.advance(task)
        self.embed = src.embed(dt).to(dev)  # [V, C]
        tied = not src.has(arch.lm_head) and cfg.tie_word_embeddings
        self.lm_head = self.embed if tied else src.lm_head(dt).to(dev)  # [V, C]
        self._quantize_head(lm_head)
        self.norm = src.final_norm(dt).to(dev)
        self._init_rope()
        log(f"loaded {src.path.name}: {cfg.num_layers} layers, 4-bit g{G}, {backend} backend on {dev}"
            + (f" ({self.arch})" if backend == "triton" else ""))

    def _init_rope(self) -> None:
        cfg = self.cfg
        inv_freq = rope.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # [D/2]
        self.max_positions = cfg.max_position_embeddings
        self.cos, self.sin = rope.rope_cos_sin(inv_freq, self.max_positions, self.device)  # [P, D/2] fp32
        # Whether the qkv GEMV (decode steps of one sequence on the GPU, on sm90 also of two) may rotate q and k
        # in its epilogue, decided once for all layers: Triton backend, a packed qkv without bias, no q/k norm in
        # between, and shapes the GEMV can split (every layer has the same).
        qkv = self.layers[0].qkv
        self.fuse_qkv_rope = (
            self.backend == "triton" and qkv.weight is None and qkv.bias is None and self.layers[0].q_norm is None
            and can_fuse_rope(qkv.qweight.shape[1], cfg.hidden_size, qkv.group_size, cfg.head_dim,
                              qkv.table["gemv"]))

    @classmethod
    def synthetic(cls, name: str, device: torch.device, group_size: int = 128, backend: str = "auto",
                  seed: int = 0, dtype: torch.dtype | None = None, deterministic: bool = False,
                  lm_head: str = "auto") -> EngineModel:
        """Random weights at a real model's shape (`SYNTHETIC_CONFIGS`), made directly in the packed
        layout on `device`: what speed is measured on where no checkpoint can be downloaded. Scales
        keep every layer's output at unit scale, so activations stay finite at any depth."""
        from lmq.models.configs import synthetic_config

        check_lm_head(lm_head)
        self = cls.__new__(cls)
        self.device, self.src, self.group_size, self.deterministic = device, None, group_size, deterministic
        self.backend = _resolve_backend(backend, device)
        self.cfg = cfg = ModelConfig.from_hf(synthetic_config(name))
        self.dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        self.arch = local_arch(device) if self.backend == "triton" else "sm80"
        table = engine_table(self.arch, deterministic, self.dtype, group_size) if self.backend == "triton" else None
        g = torch.Generator(device).manual_seed(seed)

        def packed(N: int, K: int) -> dict[str, torch.Tensor]:
            qweight = torch.randint(-2**15, 2**15, (K // 64, N, 16), generator=g, device=device,
                                    dtype=torch.int32).to(torch.int16)  # [K/64, N, 16]
            # codes - zero spread ~ 4.6: scale 1 / (4.6 sqrt(K)) gives outputs of unit variance
            scales = torch.full((K // group_size, N), 1.0 / (4.6 * K ** 0.5), device=device, dtype=torch.float16)
            zeros = torch.randint(7, 9, (K // group_size, N), generator=g, device=device, dtype=torch.uint8)
            return {"qweight": qweight, "scales": scales, "zeros": zeros}

        C, H, Hkv, D, inter = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        dt = self.dtype
        ones = torch.ones(C, device=device, dtype=dt)
        def lin(N: int, K: int) -> Linear:
            return fuse_linears([packed(N, K)], None, group_size, self.backend, dt, device, table)

        self.layers = []
        for _ in range(cfg.num_layers):
            self.layers.append(Layer(
                input_norm=ones, post_norm=ones,
                qkv=lin((H + 2 * Hkv) * D, C), o=lin(C, H * D), gate_up=lin(2 * inter, C), down=lin(C, inter),
                q_norm=torch.ones(D, device=device, dtype=dt) if cfg.arch.qk_norm else None,
                k_norm=torch.ones(D, device=device, dtype=dt) if cfg.arch.qk_norm else None,
            ))
        self.embed = torch.randn(cfg.vocab_size, C, generator=g, device=device).to(dt)  # [V, C]
        self.lm_head = self.embed if cfg.tie_word_embeddings else \
            (torch.randn(cfg.vocab_size, C, generator=g, device=device) / C ** 0.5).to(dt)
        self._quantize_head(lm_head)
        self.norm = ones
        self._init_rope()
        log(f"synthetic {name}: random 4-bit weights (g{group_size}) at the real shape, {self.backend} backend "
            f"on {device}")
        return self

    def _load_layer(self, src: WeightSource, lin: dict, i: int, G: int, table: dict | None) -> Layer:
        arch, dt, dev, backend = self.cfg.arch, self.dtype, self.device, self.backend
        p = src.layer_prefix(i)
        q, k, v, o, gate, up, down = (lin[f"{p}.{name}"] for name in arch.linears)
        qkv_bias = [src.get(f"{p}.self_attn.{x}_proj.bias") for x in "qkv"] if arch.qkv_bias else None
        return Layer(
            input_norm=src.get(f"{p}.input_layernorm.weight", dt).to(dev),
            post_norm=src.get(f"{p}.post_attention_layernorm.weight", dt).to(dev),
            qkv=fuse_linears([q, k, v], qkv_bias, G, backend, dt, dev, table),
            o=fuse_linears([o], None, G, backend, dt, dev, table),
            gate_up=fuse_linears([gate, up], None, G, backend, dt, dev, table),
            down=fuse_linears([down], None, G, backend, dt, dev, table),
            q_norm=src.get(f"{p}.self_attn.q_norm.weight", dt).to(dev) if arch.qk_norm else None,
            k_norm=src.get(f"{p}.self_attn.k_norm.weight", dt).to(dev) if arch.qk_norm else None,
        )

    def _quantize_head(self, lm_head: str) -> None:
        """`lm_head="int8"`: the head's rows in int8 with one fp32 scale each (`head_q`). The Triton backend keeps only
        those (an untied fp16 head is freed; a tied one stays as the embedding, so the int8 rows add to it); the torch
        backend computes with the same rows dequantized, so both backends give the int8 head's logits."""
        self.lm_head_mode = lm_head
        self.head_q: tuple[torch.Tensor, torch.Tensor] | None = None
        if lm_head != "int8":
            return
        if self.backend == "torch":
            self.lm_head = fake_quantize_rows(self.lm_head)
            return
        V = self.lm_head.shape[0]
        if V < MIN_N:
            raise InputError(f"--lm-head int8: the int8 head kernel is for vocabularies of {MIN_N} rows or more, this "
                             f"model has {V}; leave --lm-head at auto")
        self.head_q, self.lm_head = quantize_rows(self.lm_head), None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the freed fp16 head and the chunks' temporaries: free for the KV cache's sizing

    # -- the ops each backend runs ------------------------------------------------------------------
    def linear(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        if lin.weight is not None:
            return F.linear(x, lin.weight, lin.bias)
        return qlinear(x, lin.qweight, lin.scales, lin.zeros, lin.group_size, lin.table, lin.bias, lin.descs)

    def qkv_rope(self, h: torch.Tensor, lw, positions: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The fused qkv linear; with RoPE already applied to q and k (True) where the W4A16 GEMV does
        it in its epilogue (`fuse_qkv_rope`, and this M takes the GEMV)."""
        lin = lw.qkv
        if not self.fuse_qkv_rope:
            return self.linear(h, lin), False
        cfg = self.cfg
        rope = (positions, self.cos, self.sin, (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim)
        return qlinear_rope(h, lin.qweight, lin.scales, lin.zeros, lin.group_size, lin.table, rope, lin.descs)

    def rms_norm(self, x, weight, residual=None):
        fn = rmsnorm.rms_norm if self.backend == "triton" else rmsnorm.rms_norm_ref
        return fn(x, weight, self.cfg.rms_eps, residual)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return (silu_mul.silu_mul if self.backend == "triton" else silu_mul.silu_mul_ref)(gate_up)

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
        if self.backend == "triton":
            rope.apply_rope(q, k, positions, self.cos, self.sin)
        else:
            q.copy_(rope.apply_rope_ref(q, positions, self.cos, self.sin))
            k.copy_(rope.apply_rope_ref(k, positions, self.cos, self.sin))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                  batch: AttentionBatch) -> torch.Tensor:
        """Write the new K/V [T, H_kv, D] into the layer's cache, then attend with q [T, H, D]."""
        return cache.attention(layer, q, k, v, batch, reference=self.backend != "triton")

    # -- forward ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, batch: AttentionBatch,
                sample_rows: torch.Tensor | None = None) -> torch.Tensor:
        """`input_ids [T]` at `batch.positions` -> fp32 logits `[S, V]` of the rows `sample_rows [S]`
        (all rows when None)."""
        cfg = self.cfg
        T = input_ids.shape[0]
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = self.embed[input_ids]  # [T, C]
        residual = None
        for i, lw in enumerate(self.layers):
            if residual is None:
                residual = x
                h = self.rms_norm(x, lw.input_norm)
            else:
                h, residual = self.rms_norm(x, lw.input_norm, residual)
            qkv, roped = self.qkv_rope(h, lw, batch.positions)  # [T, (H + 2 Hkv) D]
            q = qkv[:, : H * D].view(T, H, D)
            k = qkv[:, H * D: (H + Hkv) * D].view(T, Hkv, D)
            v = qkv[:, (H + Hkv) * D:].view(T, Hkv, D)
            if lw.q_norm is not None:
                q = self.rms_norm(q.contiguous(), lw.q_norm)
                k = self.rms_norm(k.contiguous(), lw.k_norm)
            if not roped:
                self.rope(q, k, batch.positions)
            o = self.attention(q, k, v, cache, i, batch)  # [T, H, D]
            h, residual = self.rms_norm(self.linear(o.view(T, H * D), lw.o), lw.post_norm, residual)
            x = self.linear(self.silu_mul(self.linear(h, lw.gate_up)), lw.down)  # [T, C]
        if sample_rows is not None:
            x, residual = x[sample_rows], residual[sample_rows]  # [S, C]
        h, _ = self.rms_norm(x, self.norm, residual)
        if self.head_q is not None:
            return w8a16_matmul(h, *self.head_q)  # [S, V] fp32
        return F.linear(h, self.lm_head).float()  # [S, V]

    # -- sizes ---------------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of every tensor the model holds (the tied embedding counted once)."""
        seen, total = set(), 0
        tensors = [self.embed, self.lm_head, self.norm, *(self.head_q or ())]
        for lw in self.layers:
            tensors += [lw.input_norm, lw.post_norm, lw.q_norm, lw.k_norm]
            for lin in (lw.qkv, lw.o, lw.gate_up, lw.down):
                tensors += [lin.qweight, lin.scales, lin.zeros, lin.weight, lin.bias]
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total
