"""LoRA adapters for tests and benchmarks, trained here with PEFT on a fixed text (fixed seed, a few steps): small,
real and reproducible; and PEFT's merged model in HF as the reference the engine's adapters must equal.  PEFT is a
test-extra dependency: only the lab and the tests use it."""

from pathlib import Path

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXT_IDS = [(7 * i + 3) % 500 + 5 for i in range(96)]  # a fixed "text" of token ids every tiny vocabulary holds


def make_lora(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    targets=ALL_TARGETS,
    rank: int = 8,
    alpha: int = 16,
    steps: int = 6,
    lr: float = 0.05,
    **config,
) -> Path:
    """Fine-tune a LoRA on `base_dir` for `steps` steps of next-token loss on TEXT_IDS; save it as PEFT does."""
    if (out_dir / "adapter_config.json").exists():
        return out_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        **config,
    )
    peft_model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor([TEXT_IDS])
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def merged_greedy(base_dir: Path, adapter_dir: Path | None, prompt: list[int], n: int) -> list[int]:
    """HF's greedy tokens (no EOS stop) from the base model, or from PEFT's merged base + adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]
