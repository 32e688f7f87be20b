"""What a device is: board profiles, power figures, and (later) live telemetry."""
