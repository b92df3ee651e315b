"""Load GarmentsNet: the garment UNet (a ComfyUI ModelPatcher) with its per-slot GFE LoRA and Dressing-Attention
weights, from an AnyDressing-native file, a peer format, or the connected MODEL itself ('training-free')."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
from comfy_api.latest import io

from ..anydressing_core.layers import LayerKey
from ..anydressing_core.lora import SlotLoRAs
from ..anydressing_core.encoder import TAP_INPUT
from ..anydressing_core.formats import TRAINING_FREE_STRENGTH, feature_tap, inference_strength, load_contents
from ..anydressing_core.native_format import FormatError, NativeContents
from ..anydressing_core.resampler import resampler_from_weights
from . import io_types, model_folder
from .glue import NodeError

NODE = "Load GarmentsNet"
TRAINING_FREE = "training-free"


@dataclass
class GarmentsNet:
    """What Encode Garments needs: the UNet to run at t=0, the GFE LoRA per slot, and W_k'/W_v' per layer."""

    patcher: Any  # comfy.model_patcher.ModelPatcher
    loras: SlotLoRAs = field(default_factory=dict)
    dressing: dict[LayerKey, dict[str, torch.Tensor]] = field(default_factory=dict)
    source: str = TRAINING_FREE
    injection: str = "dressing"  # "dressing" (eq. 6, additive), "concat" (MagicClothing), "separate" (DreamFit)
    text_context: bool = False  # the authors ran this garment UNet with the empty prompt's text embedding
    image_proj: Any = None  # a Resampler: CLIP vision features -> cross-attention context (IMAGDressing)
    uncond_default: bool = False  # the authors let the unconditional rows see the garments (DreamFit)
    weighted_layers_only: bool = False  # garments enter only the layers the file has W_k'/W_v' for (DreamFit)
    feature_tap: str = TAP_INPUT  # where Encode Garments takes the features (metadata feature_tap)
    strength: float = TRAINING_FREE_STRENGTH  # the lambda Apply Dressing-Attention's auto strength uses

    @property
    def slots(self) -> list[str]:
        return sorted(self.loras)

    def __deepcopy__(self, memo):
        return self


def _is_sd15_family(cfg: dict) -> bool:
    return (cfg.get("context_dim") == 768 and not cfg.get("use_linear_in_transformer", False)
            and cfg.get("adm_in_channels") is None and cfg.get("in_channels") == 4
            and list(cfg.get("channel_mult", [])) == [1, 2, 4, 4])


def _diffusers_unet_config(sd: dict[str, torch.Tensor]) -> dict:
    """SD1.5 topology with the widths read from a diffusers-named UNet (so small test nets load the same way)."""
    try:
        model_channels = int(sd["conv_in.weight"].shape[0])
        in_channels = int(sd["conv_in.weight"].shape[1])
        context_dim = int(sd["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1])
        linear = sd["down_blocks.0.attentions.0.proj_in.weight"].dim() == 2
    except KeyError as e:
        raise FormatError(f"diffusers UNet lacks {e.args[0]}; not an SD1.5-architecture UNet") from None
    return {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
            "adm_in_channels": None, "in_channels": in_channels, "out_channels": 4, "model_channels": model_channels,
            "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
            "transformer_depth_middle": 1, "use_linear_in_transformer": linear, "context_dim": context_dim,
            "use_temporal_resblock": False, "use_temporal_attention": False}


# Keys of ComfyUI's diffusers key map that an SD1.5-family UNet has only for some shapes (a resnet's skip
# connection when its width changes, the class embedding of ADM models, a level's down/up-sampler): the map lists
# them for every block, so a file may lack them and still be whole.
_OPTIONAL_UNET_KEY = ("skip_connection.", "label_emb.", ".op.", ".conv.")


def _required_unet_keys(cfg: dict) -> set[str]:
    """The ldm keys every whole UNet of this config has, from ComfyUI's own key map (never from a built model)."""
    return {k for k in comfy.utils.unet_to_diffusers(cfg).values() if not any(o in k for o in _OPTIONAL_UNET_KEY)}


def _patcher_class():
    """The ModelPatcher ComfyUI's own loaders build: newer releases choose it per memory manager (CoreModelPatcher)."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def _refuse_non_sd15(name: str, cfg: Optional[dict]) -> NodeError:
    found = {k: cfg.get(k) for k in ("context_dim", "use_linear_in_transformer", "adm_in_channels",
                                     "in_channels", "channel_mult")} if cfg else {}
    return NodeError(NODE, f"{name}: the GarmentsNet UNet is not SD1.5-architecture ({found}); "
                           f"AnyDressing GarmentsNet needs an SD1.5-family UNet (context 768, 4 latent channels); "
                           f"for an SDXL MODEL pick 'training-free' (its own UNet encodes the garments)")


def _whole_unet_patcher(sd: dict[str, torch.Tensor], cfg: dict) -> Any:
    """A whole UNet file, loaded the way ComfyUI's diffusion-model loader does: the model its config builds, the
    weights through BaseModel.load_model_weights, the ModelPatcher its loaders use. Whatever memory manager the host
    runs (weights created only when loaded, LoRA applied at run time) applies to GarmentsNet too."""
    model_config = comfy.supported_models.SD15(cfg)
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    params = sum(v.numel() for v in sd.values())
    dtype = mm.unet_dtype(model_params=params, supported_dtypes=list(model_config.supported_inference_dtypes))
    manual = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual)
    model = model_config.get_model(sd, "").to(offload_device)
    model.load_model_weights(dict(sd), "")  # (it takes the tensors out of the dict it is given)
    return _patcher_class()(model, load_device=load_device, offload_device=offload_device)


def _expected_shape(diffusion_model: torch.nn.Module, key: str) -> Optional[tuple]:
    """The shape the MODEL's layer has for `key`, when the host holds that weight now (else None: not checked)."""
    owner, _, attr = key.rpartition(".")
    try:
        t = getattr(diffusion_model.get_submodule(owner), attr, None)
    except AttributeError:
        return None
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _partial_unet_patcher(sd: dict[str, torch.Tensor], base_model: Any, name: str) -> Any:
    """A partial fine-tune: the base MODEL (a clone, sharing its weights) with the file's tensors as ComfyUI 'set'
    patches. The host applies them after the MODEL's own patches (a LoRA the user loaded) whenever it loads the
    weights, whichever way it loads them, so the keys the file lacks come from the MODEL as sampled."""
    cfg = base_model.model.model_config.unet_config
    if not _is_sd15_family(cfg):
        raise _refuse_non_sd15(name, cfg)
    dm = base_model.model.diffusion_model
    for k, v in sd.items():
        shape = _expected_shape(dm, k)
        if shape is not None and tuple(v.shape) != shape:
            raise NodeError(NODE, f"{name}: {k} has shape {tuple(v.shape)}, the connected MODEL's UNet has "
                                  f"{shape}: the file was trained for another model width")
    patcher = base_model.clone()
    applied = set(patcher.add_patches({f"diffusion_model.{k}": ("set", (v,)) for k, v in sd.items()}, 1.0, 1.0))
    unknown = [k for k in sd if f"diffusion_model.{k}" not in applied]
    if unknown:
        raise NodeError(NODE, f"{name}: the connected MODEL cannot supply {unknown[0]} (different architecture)")
    return patcher


def build_unet_patcher(unet: dict[str, torch.Tensor], naming: str, name: str,
                       base_model: Optional[Any] = None) -> Any:
    """A GarmentsNet ModelPatcher from UNet weights (ldm or diffusers naming), SD1.5 architecture.

    A whole UNet loads on its own; keys the file lacks come from the base MODEL when one is connected (a partial
    fine-tune), else the file is refused. What a file must hold comes from ComfyUI's key map, never from the
    state_dict() of a freshly built model (newer memory managers build layers without weights).
    """
    sd = dict(unet)

    def partial(without: str) -> NodeError:
        return NodeError(NODE, f"{name} holds a partial GarmentsNet ({len(sd)} UNet tensors, without {without}); "
                               f"connect the base MODEL to the 'model' input so the missing weights come from it")

    cfg = None
    if naming == "diffusers":
        if "conv_in.weight" in sd:
            cfg = _diffusers_unet_config(sd)
        elif base_model is not None:
            cfg = base_model.model.model_config.unet_config
        else:
            raise partial("conv_in.weight")
        mapping = comfy.utils.unet_to_diffusers(cfg)
        unknown = [k for k in sd if k not in mapping]
        if unknown:
            raise NodeError(NODE, f"{name}: diffusers GarmentsNet keys that do not fit an SD1.5 UNet: "
                                  f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        sd = {mapping[k]: v for k, v in sd.items()}
    anchors = [a for a in ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight") if a not in sd]
    if not anchors:
        cfg = comfy.model_detection.detect_unet_config(sd, "")
        if cfg is None or not _is_sd15_family(cfg):
            raise _refuse_non_sd15(name, cfg)
        mapping = comfy.utils.unet_to_diffusers(cfg)
        unexpected = [k for k in sd if k not in set(mapping.values())]
        if unexpected:
            raise NodeError(NODE, f"{name}: GarmentsNet weights do not fit an SD1.5 UNet; unexpected keys: "
                                  f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        missing = sorted(_required_unet_keys(cfg) - set(sd))
        if not missing:
            return _whole_unet_patcher(sd, cfg)
        anchors = missing
    if base_model is None:
        raise partial(anchors[0])
    return _partial_unet_patcher(sd, base_model, name)


def from_contents(contents: NativeContents, name: str, base_model: Optional[Any]) -> GarmentsNet:
    if contents.unet:
        patcher = build_unet_patcher(contents.unet, contents.unet_naming or "ldm", name, base_model)
    elif base_model is not None:
        patcher = base_model.clone()  # shares the weights: no extra copy in memory
    else:
        raise NodeError(NODE, f"{name} holds no GarmentsNet UNet weights (only LoRA / Dressing-Attention weights), "
                              f"so GarmentsNet is the base MODEL's UNet: connect your checkpoint's MODEL to the "
                              f"'model' input")
    meta = contents.metadata
    injection = meta.get("injection", "dressing")
    if injection not in ("dressing", "concat", "separate"):
        raise NodeError(NODE, f"{name}: metadata injection {injection!r} is not 'dressing', 'concat' or 'separate'")
    text = meta.get("text_context", "1" if injection == "concat" else "0") == "1"
    try:
        tap, strength = feature_tap(contents, name), inference_strength(contents, name)
    except FormatError as e:
        raise NodeError(NODE, str(e)) from None
    image_proj = None
    if contents.image_proj:
        try:
            image_proj = resampler_from_weights(contents.image_proj, name)
        except FormatError as e:
            raise NodeError(NODE, str(e)) from None
    return GarmentsNet(patcher=patcher, loras=contents.loras, dressing=contents.dressing, source=name,
                       injection=injection, text_context=text, image_proj=image_proj,
                       uncond_default=meta.get("uncond", "0") == "1",
                       weighted_layers_only=meta.get("layers", "all") == "dressing", feature_tap=tap,
                       strength=strength)


@dataclass
class ModelFile:
    """A model file as ComfyUI's folder lookup found it (path None: not found), and where it was expected."""

    name: str
    path: Optional[str]
    expected: str


def _found(f: Union[ModelFile, str, None]) -> Optional[str]:
    if isinstance(f, ModelFile):
        return f.path
    return f


def load(choice: str, path: Union[ModelFile, str, None], base_model: Optional[Any],
         extra_path: Union[ModelFile, str, None] = None) -> GarmentsNet:
    if choice == TRAINING_FREE:
        if base_model is None:
            raise NodeError(NODE, "'training-free' uses the base MODEL's own UNet as GarmentsNet: connect your "
                                  "checkpoint's MODEL to the 'model' input, or pick a GarmentsNet file")
        return GarmentsNet(patcher=base_model.clone(), source=TRAINING_FREE)
    if _found(path) is None or not os.path.isfile(_found(path)):
        where = path.expected if isinstance(path, ModelFile) else (path or choice)
        raise NodeError(NODE, f"GarmentsNet file {choice!r} not found (expected at {where}); put it in "
                              f"ComfyUI/models/anydressing/ and refresh (the README's model table says where each "
                              f"file comes from)")
    if extra_path is not None and (_found(extra_path) is None or not os.path.isfile(_found(extra_path))):
        where = extra_path.expected if isinstance(extra_path, ModelFile) else extra_path
        raise NodeError(NODE, f"extra weights file not found (expected at {where}); put it in "
                              f"ComfyUI/models/anydressing/ and refresh")
    path, extra_path = _found(path), _found(extra_path)
    try:
        contents = load_contents(path, extra_path)
    except FormatError as e:
        raise NodeError(NODE, f"{e}") from None
    try:
        return from_contents(contents, os.path.basename(path), base_model)
    except NodeError:
        raise
    except Exception as e:  # weights that parse but cannot form a UNet: say so, never a bare traceback
        raise NodeError(NODE, f"{os.path.basename(path)}: the GarmentsNet weights do not form an SD1.5 UNet "
                              f"({type(e).__name__}: {e}); re-convert or re-download the file") from None


class LoadGarmentsNet(io.ComfyNode):
    """The node: file choice and base MODEL in, GARMENTS_NET out."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AnyDressingLoadGarmentsNet",
            display_name=NODE,
            category=io_types.CATEGORY,
            description="Loads GarmentsNet, the UNet that encodes garments (AnyDressing, run once at t=0), with its "
                        "per-slot Garment-Specific Feature Extractor LoRA and Dressing-Attention weights from a file in "
                        "models/anydressing/. 'training-free' uses the connected MODEL's own UNet instead, with no "
                        "extra weights and no extra copy in memory.",
            inputs=[
                io.Combo.Input("garments_net_name", options=[TRAINING_FREE] + model_folder.model_files(),
                               tooltip="An AnyDressing-format file from ComfyUI/models/anydressing/, or "
                                       "'training-free' to use the connected MODEL's UNet as GarmentsNet."),
                io.Model.Input("model", optional=True,
                               tooltip="Your SD1.5-family checkpoint's MODEL (SDXL: 'training-free' only). Needed "
                                       "for 'training-free' and for files that hold only LoRA / Dressing-Attention "
                                       "weights."),
                io.Combo.Input("extra_weights_name", options=["none"] + model_folder.extra_weights_files(),
                               default="none", optional=True,
                               tooltip="A second file with Dressing-Attention weights for the first one, e.g. "
                                       "MagicClothing's ip_layer.pth next to garment_extractor.safetensors "
                                       "('stable')."),
            ],
            outputs=[io_types.GarmentsNet.Output(display_name="garments_net",
                                                 tooltip="The garment encoder, for Encode Garments.")],
        )

    @classmethod
    def execute(cls, garments_net_name, model=None, extra_weights_name="none") -> io.NodeOutput:
        path = None
        if garments_net_name != TRAINING_FREE:
            path = _model_file(garments_net_name)
        extra = None if extra_weights_name in (None, "", "none") else _model_file(extra_weights_name)
        return io.NodeOutput(load(garments_net_name, path, model, extra))


def _model_file(name: str) -> ModelFile:
    return ModelFile(name, model_folder.full_path(name), model_folder.expected_path(name))
