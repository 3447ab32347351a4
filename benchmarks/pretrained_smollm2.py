"""SmolLM2-135M-Instruct (GGUF), ours against transformers: load time, peak memory, generation speed.

    python -m benchmarks.pretrained_smollm2 [--rounds 3] [--new-tokens 128]

Each contender loads the model in a fresh subprocess (so peak RSS is its own), then generates
greedily, batch 1, from the same prompt; the rounds alternate ours / transformers and the table
reports medians. transformers dequantizes the GGUF to float32 through its own loader
(`from_pretrained(folder, gguf_file=...)`, which needs `gguf` and `accelerate`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROMPT = "The history of the printing press begins"

CHILD = r"""
import json, resource, sys, time
import torch
kind, path, new_tokens, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if kind == "ours":
    import gpt
    model = gpt.load_pretrained(path)
    tok = gpt.get_tokenizer(path)
    ids = tok.encode(prompt)
else:
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    ids = tok(prompt)["input_ids"]
load_s = time.perf_counter() - start
with torch.no_grad():
    x = torch.tensor([ids])
    start = time.perf_counter()
    if kind == "ours":
        out = gpt.generate(model, x, max_new_tokens=new_tokens, temperature=0.0)
    else:
        out = model.generate(x, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0)
    gen_s = time.perf_counter() - start
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": load_s, "tokens_per_s": new_tokens / gen_s, "peak_rss_mb": peak_mb,
                  "new_ids": out[0, len(ids):].tolist()}))
"""


def run_child(kind: str, path: str, new_tokens: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, kind, path, str(new_tokens), PROMPT],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from gpt.fetch import resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    path = str(resolve_model("smollm2-135m-instruct"))
    results: dict[str, list[dict]] = {"ours": [], "transformers": []}
    for _ in range(args.rounds):
        for kind in results:
            results[kind].append(run_child(kind, path, args.new_tokens))
    same = results["ours"][0]["new_ids"] == results["transformers"][0]["new_ids"]
    print(f"{'':14}{'load s':>10}{'peak RSS MB':>14}{'gen tok/s':>12}   (medians of {args.rounds} rounds, batch 1, "
          f"{args.new_tokens} new tokens, greedy)")
    medians = {}
    for kind, runs in results.items():
        medians[kind] = {key: statistics.median(r[key] for r in runs) for key in ("load_s", "peak_rss_mb", "tokens_per_s")}
        m = medians[kind]
        print(f"{kind:14}{m['load_s']:10.2f}{m['peak_rss_mb']:14.0f}{m['tokens_per_s']:12.1f}")
    ratio = medians["ours"]["tokens_per_s"] / medians["transformers"]["tokens_per_s"]
    print(f"generation speed ratio ours/transformers: {ratio:.2f}x; identical greedy tokens: {same}")


if __name__ == "__main__":
    main()
