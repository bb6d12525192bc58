"""The "separate systems" baseline trainer: a plain transformers + PEFT LoRA training loop.

It trains what a coserve finetuning job trains, so that the two throughputs compare:
  * the data: a chat or prompt/completion JSONL file rendered by coserve's own renderer
    (server/finetune/training_data.py), so token ids and loss masks are identical;
  * the adapter: PEFT LoRA with the job's rank, alpha, target modules, no dropout;
  * the optimizer: AdamW at the job's learning rate, warmup and linear decay, over the
    same epoch order (engine/finetune/job.py), `batch_size` examples per step.
Unlike the engine it runs each batch as one right-padded forward and backward, the
ordinary way to train with PEFT (and the faster one on a CPU).

Prints one JSON line per optimizer step, flushed at once so a reader can time it:
    {"step", "total_steps", "loss", "tokens_trained", "batch_tokens", "seconds", "tokens_per_second"}
where tokens are target tokens (those with a loss), as in the server's metrics events,
and `seconds` runs from the end of the previous step. It runs until done or killed.

    .venv/bin/python bench/trainer_baseline.py --model-dir DIR --training-file train.jsonl \
        --n-epochs 3 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.finetune.job import epoch_order  # noqa: E402
from engine.finetune.job_shard import linear_schedule  # noqa: E402
from server.finetune.job_request import (  # noqa: E402
    AUTO_BATCH_SIZE,
    AUTO_N_EPOCHS,
    BASE_LEARNING_RATE,
    DEFAULT_ALPHA,
    DEFAULT_MAX_SEQ_LEN,
    DEFAULT_RANK,
    DEFAULT_TARGETS,
    WARMUP_FRACTION,
)
from server.finetune.training_data import RenderedExample, render_training_file  # noqa: E402

IGNORE = -100  # the label transformers' loss skips


def collate(examples: list[RenderedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 where a token is not trained on)."""
    width = max(len(e.token_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE)
    for row, example in enumerate(examples):
        n = len(example.token_ids)
        ids[row, :n] = torch.tensor(example.token_ids)
        mask[row, :n] = 1
        trained = zip(example.token_ids, example.target, strict=True)
        labels[row, :n] = torch.tensor([token if is_target else IGNORE for token, is_target in trained])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def peft_model(model_dir: Path, rank: int, alpha: float, targets: list[str], seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # float32: the dtype coserve computes in on a CPU without AMX (its `auto`).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    return model


def train(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    examples = render_training_file(args.training_file, tokenizer, args.max_seq_len)
    model = peft_model(args.model_dir, args.rank, args.alpha, args.target_modules, args.seed)
    order = epoch_order(len(examples), args.n_epochs, args.seed)
    total_steps = math.ceil(len(order) / args.batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(int(total_steps * WARMUP_FRACTION), total_steps))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens_trained = 0
    last = time.perf_counter()
    for step in range(total_steps):
        batch = [examples[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        # transformers averages the loss over all target tokens of the batch, as the engine does.
        loss = model(**collate(batch, pad_id)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        now = time.perf_counter()
        batch_tokens = sum(sum(e.target[1:]) for e in batch)
        tokens_trained += batch_tokens
        print(json.dumps({"step": step + 1, "total_steps": total_steps, "loss": loss.item(),
                          "tokens_trained": tokens_trained, "batch_tokens": batch_tokens,
                          "seconds": now - last, "tokens_per_second": batch_tokens / (now - last)}), flush=True)
        last = now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True, help="Hugging Face model directory")
    ap.add_argument("--training-file", type=Path, required=True, help="JSONL in a format coserve accepts")
    ap.add_argument("--n-epochs", type=int, default=AUTO_N_EPOCHS)
    ap.add_argument("--batch-size", type=int, default=AUTO_BATCH_SIZE)
    ap.add_argument("--learning-rate", type=float, default=BASE_LEARNING_RATE)
    ap.add_argument("--rank", type=int, default=DEFAULT_RANK)
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    ap.add_argument("--target-modules", nargs="+", default=DEFAULT_TARGETS)
    ap.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN)
    ap.add_argument("--seed", type=int, default=0)
    train(ap.parse_args())


if __name__ == "__main__":
    main()
