"""The USB side: the pyusb transport (the one module importing `usb`), the CCID host driver and its
reader policy, and matching configured tokens to devices."""
