"""Check eval.py's document-level numbers against lm-evaluation-harness itself, on the same model,
offline.

    pip install "lm-eval[hf]"          # not a wikigpt requirement; only this check needs it
    python scripts/compare_lm_eval.py --model out/tiny --test_file path/to/wiki.test.raw \
        [--tokenizer_name DIR] [--max_documents 10] [--output_file parity.json]

The harness's `wikitext` task reads EleutherAI/wikitext_document_level from the Hub. Offline, this
script writes the same documents (wikigpt.data.wikitext.split_documents, byte-identical to that
dataset's builder) to a local JSONL, runs the harness's own task definition on it (its
`preprocess_wikitext.py` and metrics) through `lm_eval.simple_evaluate`, runs wikigpt's evaluation
on the same text, and prints both with the relative difference. Exit status 1 if any metric differs
in the 4th significant digit.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASK_YAML = """task: wikitext_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function preprocess_wikitext.wikitext_detokenizer
process_results: !function preprocess_wikitext.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--test_file", required=True)
    parser.add_argument("--tokenizer_name")
    parser.add_argument("--max_documents", type=int)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output_file")
    args = parser.parse_args()

    import lm_eval
    import lm_eval.tasks.wikitext.preprocess_wikitext as harness_wikitext
    from accelerate import Accelerator
    from lm_eval.tasks import TaskManager

    from wikigpt.data.blocks import DataArguments, load_raw_splits
    from wikigpt.evaluation.run import EvalArguments, evaluate_split
    from wikigpt.data.wikitext import split_documents

    work = tempfile.mkdtemp(prefix="wikigpt-lm-eval-")
    rows = load_raw_splits(DataArguments(test_file=args.test_file), 0, ("test",))["test"]["text"]
    pages = split_documents(rows)[: args.max_documents]
    # The documents both sides score: wikigpt re-reads them from a raw file, the harness from JSONL.
    text_file = os.path.join(work, "docs.raw")
    with open(text_file, "w", encoding="utf-8") as f:
        f.write("\n".join(pages))
    pages = split_documents(
        load_raw_splits(DataArguments(test_file=text_file), 0, ("test",))["test"]["text"]
    )
    with open(os.path.join(work, "docs.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"page": page}) + "\n" for page in pages)
    shutil.copy(harness_wikitext.__file__, os.path.join(work, "preprocess_wikitext.py"))
    with open(os.path.join(work, "wikitext_local.yaml"), "w") as f:
        f.write(TASK_YAML.format(docs=os.path.join(work, "docs.jsonl")))

    tokenizer = args.tokenizer_name or args.model
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={args.model},tokenizer={tokenizer},dtype=float32",
        tasks=["wikitext_local"],
        task_manager=TaskManager(include_path=work),
        batch_size=args.batch_size,
        device="cpu" if not __import__("torch").cuda.is_available() else "cuda",
    )
    harness = {m: out["results"]["wikitext_local"][f"{m},none"] for m in METRICS}

    ours = evaluate_split(
        EvalArguments(
            model=args.model,
            tokenizer_name=args.tokenizer_name,
            methods="documents",
            batch_size=args.batch_size,
        ),
        DataArguments(test_file=text_file),
        Accelerator(),
    )
    rows_out, agree = [], True
    for m in METRICS:
        a, b = ours["metrics"][m]["value"], harness[m]
        same = f"{a:.4g}" == f"{b:.4g}"
        agree &= same
        rows_out.append(
            {
                "metric": m,
                "wikigpt": a,
                "lm_eval": b,
                "relative_difference": abs(a - b) / abs(b),
                "same_4_significant_digits": same,
            }
        )
        print(
            f"{m:16s} wikigpt {a:.6g}  lm-eval {b:.6g}  rel.diff {abs(a - b) / abs(b):.2e}  "
            f"{'OK' if same else 'DIFFERENT'}"
        )
    report = {
        "model": args.model,
        "documents": len(pages),
        "lm_eval_version": lm_eval.__version__,
        "counts": ours["counts"]["documents"],
        "metrics": rows_out,
        "agree": agree,
    }
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(report, f, indent=2)
    sys.exit(0 if agree and all(math.isfinite(r["wikigpt"]) for r in rows_out) else 1)


if __name__ == "__main__":
    main()
