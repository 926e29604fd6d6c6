"""Turn the quality run's JSON outputs (benchmarks/quality_gpu.sh) into the markdown tables of docs/quality.md."""

import json
import sys
from pathlib import Path


def objects(text: str):
    dec, i = json.JSONDecoder(), 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return
        obj, i = dec.raw_decode(text, i)
        yield obj


def name(path: str) -> str:
    return Path(path).name


def main(folder: str) -> None:
    rows = list(objects((Path(folder) / "eval.jsonl").read_text()))
    ppl = [r for r in rows if "kld" not in r]
    kld = {(name(r["model"]), r.get("kv_dtype", "fp16")): r for r in rows if "kld" in r}
    base = next(r["ppl"] for r in ppl if r["kv_dtype"] == "fp16" and "rtn" not in r["model"] and "awq" not in r["model"])
    by = {name(r["model"]): r["ppl"] for r in ppl if r["kv_dtype"] == "fp16"}
    print("| model | KV | windows x seqlen | perplexity | vs unquantized | mean KLD | same top-1 |")
    print("|---|---|---|---|---|---|---|")
    for r in ppl:
        k = kld.get((name(r["model"]), r["kv_dtype"]))
        kl = f"{k['kld']:.5f}" if k else "-"
        t1 = f"{100 * k['top1_agree']:.2f}%" if k else "-"
        print(f"| {name(r['model'])} | {r['kv_dtype']} | {r['windows']} x {r['seqlen']} | {r['ppl']:.4f} | "
              f"{100 * (r['ppl'] / base - 1):+.2f}% | {kl} | {t1} |")
    print()
    print("| group size | method | RTN ppl | ppl | recovers of RTN's loss |")
    print("|---|---|---|---|---|")
    for g in (64, 32):
        rtn = by.get(f"rtn-g{g}")
        for meth in ("awq", "awq-gptq"):
            q = by.get(f"{meth}-g{g}")
            if rtn is None or q is None:
                continue
            rec = (rtn - q) / (rtn - base) if rtn != base else float("nan")
            print(f"| {g} | {meth} | {rtn:.4f} | {q:.4f} | {100 * rec:.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1])
