"""Adapters between lora_ext and other systems, one module per system.

Each is imported only by the system it serves (``import lora_ext`` imports none).
"""
