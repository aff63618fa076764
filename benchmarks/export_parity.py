"""A checkpoint's exports against the checkpoint itself: `to-hf` (a stock transformers class, loaded without
Ember's code) and `to-gguf` (llama.cpp, through llama-cpp-python), on held-out text.

    python benchmarks/export_parity.py outputs/quickstart/pretrain \\
        [--documents outputs/quickstart/data/documents/validation] [--output benchmarks/results/export_parity.json]

Measured on `--tokens` tokens of held-out text: the largest absolute difference of the next-token logits, Ember
against the stock class and against llama.cpp's f32 and q8_0 exports (the tests hold f32 to 1e-4); the ratio of
each GGUF's summed NLL of those tokens to Ember's; and whether greedy generation after a 24-token prompt gives the
same tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model_name  # noqa: E402
from data_prep.documents import read_documents  # noqa: E402
from modeling.convert import main as convert_main  # noqa: E402
from modeling.loading import load_checkpoint  # noqa: E402


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def llama_cpp_greedy(llm, prompt: list[int], count: int) -> list[int]:
    llm.reset()
    tokens = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        tokens.append(int(token))
        if len(tokens) == count:
            break
    return tokens


def nll_of_targets(logits: np.ndarray, ids: list[int]) -> float:
    """Summed NLL (nats) of ids[1:] under the logits of ids[:-1]."""
    targets = np.array(ids[1:])
    values = logits[:-1]
    log_z = np.logaddexp.reduce(values, axis=1)
    return float((log_z - values[np.arange(len(targets)), targets]).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--documents", type=Path, default=None,
                        help="held-out documents (default: <checkpoint>/../data/documents/validation)")
    parser.add_argument("--tokens", type=int, default=512, help="held-out tokens compared (at most the context)")
    parser.add_argument("--generate", type=int, default=48, help="greedy tokens compared after a 24-token prompt")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    import llama_cpp  # heavy optional dependency: only this check needs it
    from transformers import AutoModelForCausalLM

    documents = args.documents or args.checkpoint.parent / "data" / "documents" / "validation"
    text = "\n".join(t for t in read_documents(documents) if t.strip())
    model, tokenizer = load_checkpoint(args.checkpoint, device="cpu")
    model.eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:args.tokens]
    prompt = ids[:24]

    def greedy(hf_model) -> list[int]:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=args.generate,
                                    min_new_tokens=args.generate, do_sample=False)
        return out[0, len(prompt):].tolist()

    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].double().numpy()
    ember_greedy, ember_nll = greedy(model), nll_of_targets(expected, ids)
    record: dict = {"checkpoint": str(args.checkpoint), "tokens": len(ids), "ember_class": type(model).__name__,
                    "machine": {"cpu": cpu_model_name(), "cores": available_cores(), "torch": torch.__version__}}
    with tempfile.TemporaryDirectory(prefix="ember_parity_") as folder:
        hf_dir = Path(folder) / "hf"
        if convert_main(["to-hf", str(args.checkpoint), str(hf_dir)]) != 0:
            return 1
        stock = AutoModelForCausalLM.from_pretrained(hf_dir).eval()  # no trust_remote_code: a stock class
        with torch.no_grad():
            stock_logits = stock(torch.tensor([ids])).logits[0].double().numpy()
        record["to_hf"] = {"class": type(stock).__name__,
                           "max_abs_logit_difference": float(np.abs(stock_logits - expected).max()),
                           "greedy_identical": greedy(stock) == ember_greedy}
        for outtype in ("f32", "q8_0"):
            path = Path(folder) / f"model-{outtype}.gguf"
            if convert_main(["to-gguf", str(args.checkpoint), str(path), f"--outtype={outtype}"]) != 0:
                return 1
            llm = llama_cpp.Llama(str(path), n_ctx=max(512, len(ids)), n_batch=512, n_ubatch=512, logits_all=True,
                                  verbose=False, n_threads=1, n_threads_batch=1,
                                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
            logits = llama_cpp_logits(llm, ids)
            record[f"to_gguf_{outtype}"] = {
                "architecture": llm.metadata.get("general.architecture"),
                "max_abs_logit_difference": float(np.abs(logits - expected).max()),
                "nll_ratio_to_ember": nll_of_targets(logits, ids) / ember_nll,
                "greedy_identical": llama_cpp_greedy(llm, prompt, args.generate) == ember_greedy}
            llm.close()
    print(json.dumps(record, indent=2))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
