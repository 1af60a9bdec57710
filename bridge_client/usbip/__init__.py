"""The usbip reader backend: the client shows each token as an emulated USB CCID reader over USB/IP."""
