"""The qualification runner: `kvmtests qualify` boots a kernel image in an emulator and runs the suite inside.

`qualify` (the command and its verdict), `kernels` and `kbuild` (stock kernels fetched, or built from
Debian's source with `kconfig/` fragments), `initramfs` (the guest's /init and what it loads),
`console` (what every emulator run shares: console markers, the bounded run, the one-line error), and
one module per emulator (`qemu`). It imports the verdicts (to print the summary), the machine layer
and itself.
"""
