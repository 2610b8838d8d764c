"""``fedtune chat``: answer prompts with the base model plus a federated adapter, optionally
next to the base model alone, so a user sees what training changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from client.model import Quantization, default_cache_dir, load_base, resolve_model


class ChatSession:
    def __init__(
        self,
        model: str,
        adapter_dir: Path,
        *,
        quantization: Quantization = Quantization.NONE,
        cache_dir: Path | None = None,
    ) -> None:
        from peft import PeftModel

        self.base = load_base(resolve_model(model), quantization, cache_dir or default_cache_dir())
        self.model = PeftModel.from_pretrained(self.base.model, str(adapter_dir))
        self.model.eval()

    @torch.no_grad()
    def answer(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        use_adapter: bool = True,
        seed: int = 0,
    ) -> str:
        tok = self.base.tokenizer
        messages = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tok(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": tok.pad_token_id,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False)
        torch.manual_seed(seed)
        if use_adapter:
            out = self.model.generate(**inputs, **kwargs)
        else:
            with self.model.disable_adapter():
                out = self.model.generate(**inputs, **kwargs)
        return str(
            tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        ).strip()
