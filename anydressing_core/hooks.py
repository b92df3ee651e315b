"""How the garment term reaches a UNet's self-attention layers: through patch lists every pack appends to.

Eq. 6's garment term only adds to a layer: O = SelfAttn(Q,K,V) + lambda * G(Q, F W_k', F W_v'), and to_out is linear,
so to_out(SelfAttn + lambda G) = to_out(SelfAttn) + W_out (lambda G). ComfyUI's transformer block runs, per layer:

    n = norm1(x); n, context, value = attn1_patch...(n, n, n); n = attn1 (or the one attn1 replacement) ...;
    n = attn1_output_patch...(n); x = n + x; x = middle_patch...(x)

The pack adds two entries there and takes no slot that only one pack can hold:

- an attn1_patch at the front of the list keeps the layer's normed input n (the block's own token layout, before
  any patch tiles or merges the tokens) for this layer call; for the concat formats (MagicClothing) it joins the
  garment tokens to the context and value, so the layer's own softmax runs over both;
- a middle_patch adds W_out (lambda G) to x, with Q = to_q(n) from the kept input.

So Self-Attention Guidance, Perturbed-Attention Guidance, HyperTile, ToMe and any other pack keep the attn1 replace
slot and the attention itself; whatever they do to the self-attention, the garments are added once, on the whole
token grid (garment masks included). The layers' own modules (to_q, to_out) run their forward, so a LoRA the host
applies at run time, and its memory management, reach the garment term too.
"""

from __future__ import annotations

from typing import Optional

import torch

from .branch import DressingBranch
from .layers import LayerKey

# extra_options key (one transformer block call) under which the attn1_patch keeps the layer's normed input
INPUT_KEY = "anydressing_attn1_input"


def layer_key(extra: dict) -> Optional[LayerKey]:
    block = extra.get("block")
    if block is None:
        return None
    return (block[0], int(block[1]), int(extra.get("block_index", 0)))


class GarmentTerm:
    """The garment branches of one MODEL (one per Apply Dressing-Attention node) and the blocks they dress.

    Immutable: a further Apply node makes a new term with one more branch (copy-on-write), so the upstream MODEL is
    never changed. `input_patch`, `middle_patch` and `output_patch` are the callables ComfyUI's patch lists hold.
    """

    def __init__(self, blocks: dict[LayerKey, torch.nn.Module], branches: list[DressingBranch]):
        self.blocks = dict(blocks)
        self.branches = list(branches)
        self.input_patch = InputPatch(self)
        self.middle_patch = MiddlePatch(self)
        self.output_patch = OutputPatch(self)

    def with_branch(self, branch: DressingBranch, blocks: dict[LayerKey, torch.nn.Module]) -> "GarmentTerm":
        return GarmentTerm({**self.blocks, **blocks}, self.branches + [branch])

    def __deepcopy__(self, memo):
        return self  # immutable; ModelPatcher.clone() must not duplicate garment tensors

    # -- the two halves -----------------------------------------------------------------------------------------
    def keep_input(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict):
        key = layer_key(extra)
        if key is None or key not in self.blocks:
            return n, context, value
        extra[INPUT_KEY] = n
        joined = [b.context_tokens(key, n, extra) for b in self.branches if b.mode == "concat"]
        joined = [j for j in joined if j is not None]
        if joined:  # concat mode: one softmax over the latent tokens and the garment tokens
            context = torch.cat([context] + [j[0].to(context.dtype) for j in joined], dim=1)
            value = torch.cat([value] + [j[1].to(value.dtype) for j in joined], dim=1)
        return n, context, value

    def add_term(self, x: torch.Tensor, extra: dict) -> torch.Tensor:
        key = layer_key(extra)
        n = extra.pop(INPUT_KEY, None)
        block = self.blocks.get(key) if key is not None else None
        if n is None or block is None or n.shape[:2] != x.shape[:2]:
            return x
        pieces = []
        q = None
        for branch in self.branches:
            if branch.mode == "concat" or key not in branch.layers or not branch.active_at(extra):
                continue
            if q is None:
                q = block.attn1.to_q(n)
            found = branch.output(key, q, extra)
            if found:
                pieces.extend(found)
        if not pieces:
            return x
        out_proj = block.attn1.to_out[0]
        x = x.clone()
        for start, end, g in pieces:
            g = g.to(x.dtype)
            bias = out_proj(g.new_zeros((1, 1, g.shape[-1])))  # (the layer's bias, as the host applies it now)
            x[start:end] += out_proj(g) - bias
        return x

    def trim(self, n: torch.Tensor, extra: dict) -> torch.Tensor:
        """Concat mode under an attn1 replacement that returns one token per key (Perturbed-Attention Guidance's
        perturbed pass returns the values): only the latent tokens' rows go on."""
        kept = extra.get(INPUT_KEY)
        if kept is not None and n.dim() == 3 and n.shape[1] > kept.shape[1]:
            return n[:, :kept.shape[1]]
        return n


class _TermPatch:
    """One of the term's three patches: shared, not copied, when ComfyUI deep-copies the patch lists of a clone."""

    def __init__(self, term: GarmentTerm):
        self.term = term

    def __deepcopy__(self, memo):
        return self


class InputPatch(_TermPatch):
    """attn1_patch: keeps the layer's input; joins concat-mode garment tokens to its context and value."""

    def __call__(self, n, context, value, extra):
        return self.term.keep_input(n, context, value, extra)


class MiddlePatch(_TermPatch):
    """middle_patch: adds W_out (lambda G) to the block's hidden states after its self-attention."""

    def __call__(self, x, extra):
        return self.term.add_term(x, extra)


class OutputPatch(_TermPatch):
    """attn1_output_patch (concat formats only): the latent tokens' rows of an output with one row per key."""

    def __call__(self, n, extra):
        return self.term.trim(n, extra)


def find_term(transformer_options: dict) -> Optional[GarmentTerm]:
    """The garment term installed in these transformer_options (None: not dressed)."""
    for p in (transformer_options.get("patches") or {}).get("middle_patch", []):
        if isinstance(p, MiddlePatch):
            return p.term
    return None


def install(transformer_options: dict, branch: DressingBranch, blocks: dict[LayerKey, torch.nn.Module]) -> GarmentTerm:
    """Put `branch` into transformer_options (a clone's own dict): the MODEL's term gets one more branch, or a new
    term's patches go in (its input patch first in attn1_patch, its middle patch last in middle_patch). The patch
    dict and lists are replaced, never edited, so other holders of the old ones are untouched."""
    patches = dict(transformer_options.get("patches") or {})
    old = find_term(transformer_options)
    term = old.with_branch(branch, blocks) if old is not None else GarmentTerm(blocks, [branch])
    pairs = (("attn1_patch", InputPatch, term.input_patch, "front"),
             ("middle_patch", MiddlePatch, term.middle_patch, "back"),
             ("attn1_output_patch", OutputPatch, term.output_patch, "back"))
    for name, kind, patch, where in pairs:
        if name == "attn1_output_patch" and not any(b.mode == "concat" for b in term.branches):
            continue
        items = list(patches.get(name, []))
        at = next((i for i, p in enumerate(items) if isinstance(p, kind)), None)
        if at is not None:
            items[at] = patch
        elif where == "front":
            items.insert(0, patch)
        else:
            items.append(patch)
        patches[name] = items
    transformer_options["patches"] = patches
    return term
