"""Train prism's built-in MoE language model on the train split of the built-in corpus.

The result is a stock transformers OLMoE checkpoint (safetensors, float16) plus a byte-level BPE
tokenizer, loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer`` and no prism
import. Everything is seeded: the same command on the same torch build gives the same weights.

    python scripts/train_builtin_model.py --minutes 90 --out prism_cli/data/builtin-model

Training stops at ``--steps`` optimizer steps, at ``--stop-step``, or after ``--minutes`` of wall
time, whichever comes first; the learning-rate schedule (linear warm-up, cosine decay to 10 %) is laid
out over ``--steps``, so a run cut short ends at a higher learning rate than planned. A run stopped
by the clock is reproduced exactly with ``--stop-step`` set to the step count it reached (recorded in
``training_log.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

from prism_cli.data import split_text
from prism_cli.data.windows import token_windows
from prism_cli.evaluation.perplexity import perplexity

SPECIAL = "<|endoftext|>"


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``text`` with the ``tokenizers`` library (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL
    )


def model_config(vocab_size: int, special_id: int) -> OlmoeConfig:
    return OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        norm_topk_prob=False,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
        bos_token_id=special_id,
        eos_token_id=special_id,
        pad_token_id=special_id,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--stop-step", type=int, default=None, help="stop here; the schedule still spans --steps")
    ap.add_argument("--minutes", type=float, default=120.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-tokens", type=int, default=32_768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(split_text("train"), args.vocab)
    train_ids = np.asarray(tokenizer(split_text("train"), add_special_tokens=False)["input_ids"], dtype=np.int64)
    eval_windows = token_windows(tokenizer, split_text("eval"), args.seq_len, args.eval_tokens)
    print(f"tokenizer trained, {len(train_ids):,} train tokens ({time.perf_counter() - t0:.1f}s)", flush=True)

    config = model_config(len(tokenizer), tokenizer.convert_tokens_to_ids(SPECIAL))
    config.output_router_logits = True
    model = OlmoeForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = np.random.default_rng(args.seed)
    span = args.seq_len + 1
    deadline = time.perf_counter() + args.minutes * 60
    log: list[dict] = []
    step = 0
    last = min(args.steps, args.stop_step or args.steps)
    while step < last and time.perf_counter() < deadline:
        starts = gen.integers(0, len(train_ids) - span, size=args.batch)
        batch = torch.from_numpy(np.stack([train_ids[s : s + span] for s in starts]))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(input_ids=batch[:, :-1], labels=batch[:, 1:].contiguous(), use_cache=False)
        # OLMoE's loss with labels shifts internally; we pass pre-shifted labels, so compute it here.
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        total = loss + config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr_at(step):.2e} {time.perf_counter() - t0:.0f}s", flush=True)
        if step % args.eval_every == 0:
            model.eval()
            ppl = perplexity(model, eval_windows, batch_size=16).perplexity
            model.train()
            log.append({"step": step, "train_loss": loss.item(), "eval_ppl_subset": ppl, "seconds": time.perf_counter() - t0})
            print(f"== step {step} eval ppl (first {args.eval_tokens} tokens) {ppl:.2f}", flush=True)

    model.eval()
    model.config.output_router_logits = False
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=args.out.parent))
    model.to(torch.float16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "training_log.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "steps": step, "log": log}, indent=1)
    )
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    print(f"saved {args.out} after {step} steps, {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
