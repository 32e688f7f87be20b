"""The edge agent: serves apps on the device and decides, per request, where each model runs."""
