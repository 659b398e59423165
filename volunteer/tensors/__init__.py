"""Tensor wire format and compression codecs: see :mod:`.serialization` and :mod:`.codecs`."""
