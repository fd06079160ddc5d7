"""Pretrained backbones and their weight files: EfficientNet-Lite0 and ResNet-18 in Flax, and
PyTorch / safetensors files read and written without torch. No method's networks live here
(the patch networks are :mod:`ustad.uninformed_students.nets`, STFPM's pyramids
:mod:`ustad.stfpm.nets`)."""
