"""Build the tiny Llama-shaped model and tokenizer the project runs on without a model hub.

Seeded and local: a byte-level BPE tokenizer (vocabulary 4096, specials <|pad|> <|bos|> <|eos|>) trained on
this Python installation's standard-library sources, and a 4-layer LlamaForCausalLM (hidden 128, 4 heads,
2 KV heads, head_dim 32) with weights drawn at std 0.08 so greedy decoding has clear margins. Saved in HF
format (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a chat template).

    python scripts/build_tiny_model.py [--out .models/tiny-llama] [--seed 0] [--force]

Needs torch, tokenizers and transformers (installed with the vLLM stack by scripts/setup.sh --vllm).
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / ".models" / "tiny-llama"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


def build(out: Path, seed: int = 0, force: bool = False) -> Path:
    """Build the model into ``out`` (skipped when it already holds one built with the same seed)."""
    marker = out / "dynaserve_build.json"
    if marker.exists() and not force and json.loads(marker.read_text()).get("seed") == seed:
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in files], trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                     pad_token="<|pad|>")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out))

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=352, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.fill_(1.0)
    model.save_pretrained(str(out), safe_serialization=True)
    marker.write_text(json.dumps({"seed": seed, "params": sum(p.numel() for p in model.parameters())}))
    return out

