"""Trace: real access traces in (valgrind lackey, Pin's pinatrace, perf, the kernel's kvm_page_fault, plain R/W/X),
converted once into a compact binary file that vCPUs stream; `trace record` and `trace summary`.

  formats.py   the readers: one per format, streaming, every bad line one error with its number
  store.py     the converted file: first-touch page mapping, one part per thread, read in chunks
  record.py    `shmmmu trace record`: a command under valgrind lackey
  summary.py   `shmmmu trace summary`: a tracepoint file (the emulator's or any kernel's) counted
  kernel_lines.py  any kernel's kvm/kvmmmu tracepoint lines, as tools and mail print them, read into events
  events.py    the events the emulator fires: 5.13's layouts and formats, and trace-cmd report's text of them
  tracedat.py  a trace.dat written by trace-cmd restore (and read through trace-cmd report)
"""
