"""Bridges to other libraries' modules (transformers): load their weights into patterndsl layers."""
