"""LoRA serving: PEFT adapter parsing (`adapter`), batch-aware LoRA layers (`layers`), the tiered store (`store`)."""
