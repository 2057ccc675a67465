"""Label-value conventions shared by every layer (see DESIGN.md, "Label conventions").

Label maps are ``uint8 [H, W]``: ``0`` background, ``1..C`` foreground classes, ``255`` ignore
(VOC boundary), ``254`` biased (removed by debiasing, filled by complementing).
"""

BACKGROUND = 0
BIASED = 254
IGNORE = 255
MAX_CLASSES = 253  # 1..253 are usable foreground class ids

__all__ = ["BACKGROUND", "BIASED", "IGNORE", "MAX_CLASSES"]
