"""Garment slots: the categories the paper trains one GFE LoRA set for."""

SLOTS: tuple[str, ...] = ("upper", "lower", "dress", "shoes", "hat", "bag", "other")
MAX_GARMENTS = 6  # garment inputs of Encode Garments (image_1..6, mask_1..6) and of Garment Masks (mask_1..6)


def check_slot(slot: str) -> str:
    """Return `slot` if known, else raise with the list of valid slots."""
    if slot not in SLOTS:
        raise ValueError(f"unknown garment slot {slot!r}; valid slots: {', '.join(SLOTS)}")
    return slot
