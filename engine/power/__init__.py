"""GPU power and clock control: device backends and the SLO-aware frequency governor.

`device.GpuDevice` is the small interface the governor and the metrics need. NVML
drives a real card (`nvml_device`); `simulated_device` stands in for one in tests
and what-if studies and is never chosen by default. `governor` picks the SM clock.
"""
