"""The LM-head product of one decoding step, in four equivalent forms: which streams the weights fastest.

A decoding step multiplies B hidden vectors (B, D) by the (V, D) head. The forms give the
same numbers up to float rounding; on a CPU they differ a lot in speed, which is why
`gpt.generate.next_token_logits_function` picks one per batch size:

    plain        hidden @ W.T            what nn.Linear does
    transposed   hidden @ W_t            W_t = W.T.contiguous(), a (D, V) copy made once
    swapped      (W @ hidden.T).T        the same weights, the product the other way round
    blocked      bmm over row blocks     W viewed as one (V / threads, D) block per thread (no
                                         copy), one batched product torch spreads over its threads

Each form runs `--repeats` times per round, the rounds interleave the forms, and the
median is reported with the bandwidth it implies (bytes of W read per second).

    python -m benchmarks.decode_head                          # GPT-2 vocabulary, D = 256, 384, 768
    python -m benchmarks.decode_head --widths 576 --vocab 49152 --batch-sizes 1   # SmolLM2's head
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt.linear import row_blocked_product


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--widths", default="256,384,768", help="comma-separated d_model values")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated rows per step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocab {args.vocab}, fp32")
    print(f"{'D':>5s} {'B':>3s} {'form':12s} {'ms':>7s} {'GB/s':>6s}")
    generator = torch.Generator().manual_seed(0)
    for width in (int(w) for w in args.widths.split(",")):
        weight = torch.randn(args.vocab, width, generator=generator) * 0.02  # (V, D)
        weight_t = weight.T.contiguous()  # (D, V)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            hidden = torch.randn(batch, width, generator=generator)  # (B, D)
            forms = {
                "plain": lambda: hidden @ weight.T,
                "transposed": lambda: hidden @ weight_t,
                "swapped": lambda: (weight @ hidden.T).T,
                "blocked": lambda: row_blocked_product(hidden, weight, torch.get_num_threads()),
            }
            reference = forms["plain"]()
            for form in forms.values():  # warm-up, and the forms agree
                torch.testing.assert_close(form(), reference, atol=1e-4, rtol=1e-4)
            times: dict[str, list[float]] = {name: [] for name in forms}
            for _ in range(args.rounds):
                for name, form in forms.items():
                    start = time.perf_counter()
                    for _ in range(args.repeats):
                        form()
                    times[name].append((time.perf_counter() - start) / args.repeats)
            for name, values in times.items():
                seconds = statistics.median(values)
                print(f"{width:5d} {batch:3d} {name:12s} {1000 * seconds:7.2f} {weight.numel() * 4 / seconds / 1e9:6.1f}")


if __name__ == "__main__":
    main()
