"""The qualification runner: `kvmtests qualify` boots a kernel image in an emulator and runs the suite inside.

`qualify` (the command, its cells and its verdict), `kernels` and `kbuild` (stock kernels fetched,
or built from Debian's source with `kconfig/` fragments), `initramfs` (the guest's /init and what it
loads), `rootfs` (the host files a guest without 9p carries), `console` (what every emulator run
shares: console markers, the bounded run, results over the console, the one-line error), and one
module per emulator (`qemu`, `bochs`). It imports the verdicts (to print the summary), the machine
layer and itself.
"""
