"""The jobs: what a command runs against a repository, with no argument parsing and no output
beyond warnings and notes (``pipeline.console``). The CLI (``pipeline.cli``) calls them; tests
and benchmarks call them directly.

``backup``          an image file, block device or overlay: its plan (parent, what to read) and
                    its run under the shared ``backup`` lock
``vsphere_backup``  a VMware VM, one point per disk, through one snapshot
``vsphere``         the vSphere control plane (pyvmomi): VM, snapshot, disks, CBT
``runner``          one engine run of one or more disks: its set-up and the commit of one
                    point per disk
``run_loop``        the run's loop: items in flight, results into each disk's manifest, the
                    disks' shared address space, tallies and Ray nodes
``plan``            byte ranges to read and work items (pure functions)
``assemble``        a point's manifest, leaf by leaf, as results stream in
``overlay_source``  an overlay as a backup source on the workers
``copy``            points of one repository into another (a backup whose source is a point)
``restore``         a point written to a file or block device, on threads
``jobfile``         job files: sources, schedules, keep rules; when a source is due
``jobstate``        a job file's state on this machine (last runs, the server) and its lock

The engines they run on are ``pipeline.engines``.
"""
