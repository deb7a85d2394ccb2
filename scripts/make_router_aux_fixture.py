#!/usr/bin/env python3
"""The MoE router's load-balancing loss as transformers computes it, for tests/parity_peft.rs.

For the tiny mixtures of experts (tests/fixtures/models/{mixtral,qwen3_moe}) with their PEFT all-linear adapters
(tests/fixtures/peft/*/adapter, from make_family_fixtures.py): a padded batch run by transformers with
`output_router_logits=True` and `router_aux_loss_coef=0.5` (large, so its gradient shows), in float64 with the eager
experts. Writes tests/fixtures/peft/{name}/router_aux.safetensors: input_ids, attention_mask, labels, the
cross-entropy `nll`, the unweighted `aux_loss`, the model's `loss` (nll + 0.5 aux) and every LoRA tensor's gradient
of that loss (`grad.*`).

  python scripts/make_router_aux_fixture.py
"""
from pathlib import Path

import peft
import torch
import transformers
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
COEF = 0.5


def run(name, ids, mask, labels, router_logits):
    base = transformers.AutoModelForCausalLM.from_pretrained(
        FIXTURES / "models" / name, attn_implementation="eager", experts_implementation="eager",
        dtype=torch.float64)
    base.router_aux_loss_coef = COEF
    model = peft.PeftModel.from_pretrained(base, FIXTURES / "peft" / name / "adapter", is_trainable=True).double()
    out = model(ids, attention_mask=mask, labels=labels, output_router_logits=router_logits)
    out.loss.backward()
    grads = {"grad." + n.replace(".default", ""): p.grad.float().contiguous()
             for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def main():
    for name in ["mixtral", "qwen3_moe"]:
        vocab = transformers.AutoConfig.from_pretrained(FIXTURES / "models" / name).vocab_size
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(21))
        mask = torch.ones_like(ids)
        mask[1, 11:] = 0  # the second row is padded
        ids[1, 11:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100
        with_aux, grads = run(name, ids, mask, labels, True)
        plain, plain_grads = run(name, ids, mask, labels, False)
        nll = plain.loss.detach()
        aux = with_aux.aux_loss.detach()
        assert abs(with_aux.loss.item() - (nll + COEF * aux).item()) < 1e-9
        moved = max(((grads[k] - plain_grads[k]).norm() / grads[k].norm()).item() for k in grads)
        tensors = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                   "nll": nll.float().reshape(1), "aux_loss": aux.float().reshape(1),
                   "loss": with_aux.loss.detach().float().reshape(1), "coef": torch.tensor([COEF]), **grads}
        save_file(tensors, FIXTURES / "peft" / name / "router_aux.safetensors")
        print(f"{name}: nll {nll.item():.6f}, aux {aux.item():.6f}, {len(grads)} gradients, the aux term moves "
              f"them by up to {moved:.3f} (relative)")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")


if __name__ == "__main__":
    main()
