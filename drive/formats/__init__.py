"""Virtual disk formats generated on the fly from a block source: raw, qcow2, VHD, VHDX and
VMDK (``registry`` names them), and exporting one to a file (``export``)."""
