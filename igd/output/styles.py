"""The vocabulary of attribution pictures (igd.output.figure, igd.output.rendering), importable
without numpy or torch, so that igctl can offer it as choices."""

OVERLAY = "overlay"  # igd's own look (igd.output.figure): the default
REGIONS = "regions"  # XRAI's most important regions (a result of --regions xrai)
STYLES = (OVERLAY, REGIONS, "heat_map", "blended_heat_map", "masked_image", "alpha_scaling")  # the last four: captum's
REGION_AREAS = (10, 20, 30)  # the regions style outlines the top 10, 20 and 30 % of the area
SIGNS = ("all", "positive", "negative", "absolute_value")
DEFAULT_STYLE = OVERLAY
DEFAULT_SIGN = "absolute_value"
DEFAULT_OUTLIER_PERC = 2.0
