"""Networks: the patch-descriptor CNNs and the pretrained backbones they are distilled from."""

from ustad.models.patch_net import ARCHITECTURES, PatchNet, patch_net

__all__ = ["ARCHITECTURES", "PatchNet", "patch_net"]
