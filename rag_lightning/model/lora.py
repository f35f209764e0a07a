"""LoRA adapters (peft) on a causal language model, and checkpoints that hold what trains, not the frozen base.

`with_lora` wraps a model in peft's PeftModel: low-rank adapters beside the layers `target_modules` names, every
weight of the model itself frozen. Layer names depend on the architecture (Llama's q_proj and v_proj, GPT-2's
c_attn), so `check_lora_targets` refuses a name that matches no layer, listing the ones there are, before any
weights are read.

A Lightning checkpoint holds the LightningModule's whole state dict, the frozen base included: for a 135M model,
540 MB of weights that the base model's folder already holds, in every checkpoint. `without_frozen` drops a
part's frozen parameters from a state dict (in on_save_checkpoint) and `with_frozen` puts back those of the module
being loaded into, built again from its folder (in on_load_checkpoint, which Lightning calls before its strict
load_state_dict):

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = without_frozen(checkpoint["state_dict"], self.rag.generator, "rag.generator")

    def on_load_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = with_frozen(checkpoint["state_dict"], self.rag.generator, "rag.generator")

Loading stays strict where it matters: an adapter weight (or any trainable parameter, or buffer) missing from the
checkpoint, or a key the module does not have, still fails load_state_dict. This is right only for a part whose
frozen parameters come back identical when it is built again from the config, as a base model loaded from its
folder does (training never changes it); hence the part is named, not every frozen parameter of the module (a
frozen part initialised at random would not come back the same).

`merged` folds the adapters into the base weights, giving a plain transformers model for export.
"""

from __future__ import annotations

import copy
import warnings

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from rag_lightning.errors import UserError

# the layer kinds LoRA adapts that a name in target_modules may sensibly mean (GPT-2's Conv1D is a linear layer)
ADAPTABLE = (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# the layer kinds listed as candidates in the error for a target name that matches none
LINEAR = (nn.Linear, Conv1D)


def check_lora_targets(model: nn.Module, target_modules: list[str], key: str) -> None:
    """Refuse, with one line naming `key`, target module names that match no layer of `model` LoRA can adapt,
    listing the names of its linear layers. A name matches as peft matches it: a layer's full name, or its end
    after a dot ("q_proj" matches "model.layers.0.self_attn.q_proj"). Reads no weights: a skeleton of the model
    on the meta device will do."""
    if not target_modules:
        raise UserError(f"{key}: lists no layer; name the linear layers that get adapters, e.g. q_proj, v_proj")
    adaptable = [name for name, module in model.named_modules() if isinstance(module, ADAPTABLE)]
    missing = [target for target in target_modules if not any(_matches(name, target) for name in adaptable)]
    if missing:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, LINEAR)}
        )
        raise UserError(
            f"{key}: {', '.join(missing)} {'matches' if len(missing) == 1 else 'match'} no layer of the "
            f"{type(model).__name__}; its linear layers: {', '.join(linear)}"
        )


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith(f".{target}")


def with_lora(
    model: PreTrainedModel,
    rank: int,
    alpha: int,
    dropout: float,
    target_modules: list[str],
    key: str = "target_modules",
) -> PeftModel:
    """`model` with LoRA adapters of this rank, scale alpha / rank and dropout on their input, beside the layers
    target_modules names (checked first, see check_lora_targets; `key` names the setting in its error). Only the
    adapters' weights require grad.

    The model is changed in place (its target layers are wrapped) and becomes the returned PeftModel's base.
    Never call requires_grad_(True) on the result: that would unfreeze the base too.
    """
    check_lora_targets(model, target_modules, key)
    targeted = [layer for name, layer in model.named_modules() if any(_matches(name, t) for t in target_modules)]
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        # GPT-2's Conv1D keeps its weight transposed; peft would set this itself, with a warning
        fan_in_fan_out=any(isinstance(layer, Conv1D) for layer in targeted),
    )
    with warnings.catch_warnings():
        # peft 0.21 reads model.is_gradient_checkpointing, which transformers 5 deprecates (FutureWarning)
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def frozen_parameters(module: nn.Module, prefix: str = "") -> dict[str, nn.Parameter]:
    """Module's parameters that do not require grad, by their key in a state dict that holds module under
    `prefix` ("" for module's own; a tied parameter under each of its names, as the state dict has it)."""
    named = module.named_parameters(prefix=prefix, remove_duplicate=False)
    return {name: p for name, p in named if not p.requires_grad}


def without_frozen(state_dict: dict[str, Tensor], module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """`state_dict` less the frozen parameters of `module`, which it holds under `prefix` (e.g. "rag.generator"
    for a LightningModule's self.rag.generator): what a checkpoint needs to hold. Trainable parameters, buffers
    and whatever lies outside module stay."""
    frozen = frozen_parameters(module, prefix)
    return {key: value for key, value in state_dict.items() if key not in frozen}


def with_frozen(state_dict: dict[str, Tensor], module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """`state_dict` completed with module's own frozen parameters where it lacks them, so that a strict
    load_state_dict accepts a checkpoint saved with without_frozen (and still fails on a missing trainable
    parameter or an unknown key); `prefix` as for without_frozen. A frozen parameter the state dict has is kept:
    a full checkpoint loads as before."""
    missing = {key: p.detach() for key, p in frozen_parameters(module, prefix).items() if key not in state_dict}
    return {**missing, **state_dict}


def merged(model: PeftModel) -> PreTrainedModel:
    """A plain transformers model with model's adapters merged into its weights, for export: its save_pretrained
    folder loads with AutoModelForCausalLM alone. Works on a deep copy: `model` keeps its adapters and can go on
    training."""
    return copy.deepcopy(model).merge_and_unload()
