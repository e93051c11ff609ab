"""Where backups read from: image files and block devices (``image``), vSphere datastore disks
over HTTPS (``datastore``)."""
