"""The ``lora-ext`` command, its model loader, tasks and shipped adapters; the core never imports this package."""
