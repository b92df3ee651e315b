"""Garment slots: the categories the paper trains one GFE LoRA set for."""

SLOTS: tuple[str, ...] = ("upper", "lower", "dress", "shoes", "hat", "bag", "other")
MAX_GARMENTS = 6  # garment inputs of Encode Garments (image_1..6, mask_1..6) and of Garment Masks (mask_1..6)

