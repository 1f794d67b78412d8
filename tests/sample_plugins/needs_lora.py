"""A plugin that requires another and conflicts with full fine-tuning."""

requires = ("lorax",)
conflicts = ("full",)
