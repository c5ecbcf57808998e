"""The model card's sample: a generation from the start of a held-out document, with what was retrieved.

    python bench/model_sample.py --db model-work/db [--model DIR] [--doc stdlib/heapq.py] [--lines 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=Path, default=Path("model-work/db"))
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--doc", default="stdlib/heapq.py")
    ap.add_argument("--prompt-tokens", type=int, default=140)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--lines", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args()
    from retrodb.model.corpus import held_out_documents
    from retrodb.model.lm import load

    lm = load(args.model)
    (doc,) = held_out_documents([args.doc])
    ids = lm.tokenizer.encode(doc.text, add_special_tokens=False).ids[: args.prompt_tokens]
    prompt = lm.tokenizer.decode(ids)
    g = lm.generate(args.db, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0)
    plain = lm.generate(None, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0,
                        retrieval=False)
    print(f"Prompt: the first {len(ids)} tokens of the held-out `{args.doc}` (not in the database); "
          f"temperature {args.temperature}, seed 0.\n")
    print("```python\n" + prompt + "\n```\n")
    print(f"Generated with retrieval (first {args.lines} lines):\n")
    print("```python\n" + "\n".join(g.text.splitlines()[: args.lines]) + "\n```\n")
    print(f"Generated without retrieval, same seed (first {args.lines} lines):\n")
    print("```python\n" + "\n".join(plain.text.splitlines()[: args.lines]) + "\n```\n")
    print("What was retrieved for each chunk (k = 2):\n")
    print("| chunk | its text (start) | neighbour | score | neighbour text (start) |")
    print("|---|---|---|---|---|")
    for i, c in enumerate(g.chunks):
        for n in c.neighbours:
            print(f"| {i} | `{_cell(c.text)}` | {n['doc_id']} | {n['score']:.3f} | `{_cell(n['text'])}` |")


def _cell(s: str, width: int = 60) -> str:
    s = " ".join(s.split()).replace("|", "\\|").replace("`", "'")
    return s if len(s) <= width else s[: width - 1] + "…"


if __name__ == "__main__":
    main()
