"""The vocabulary of attribution pictures (igd.output.rendering), importable without numpy or
torch, so that igctl can offer it as choices."""

STYLES = ("heat_map", "blended_heat_map", "masked_image", "alpha_scaling")
SIGNS = ("all", "positive", "negative", "absolute_value")
DEFAULT_STYLE = "blended_heat_map"
DEFAULT_SIGN = "absolute_value"
DEFAULT_OUTLIER_PERC = 2.0
