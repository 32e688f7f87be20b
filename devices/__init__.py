"""What a device is: board profiles (``profiles``), detection of the board we
run on (``detect``) and live telemetry (``telemetry``). No decisions here."""
