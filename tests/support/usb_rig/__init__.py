"""The umockdev rig: the simulator as an emulated USB device reached through the real libusb.

`handler.py` runs under Debian's /usr/bin/python3 (the process that owns the umockdev testbed);
`rig.py` is what tests import. See docs/internals.md "The USB rig".
"""
