"""The debug console (agent.debug_console): an interactive shell for the developer.

  server.py    DebugConsole: /dev/console, or one pty + shell per connection (vsock, unix)
  shell.py     the shell process: forked by the zygote, followed through a pidfd
  protocol.py  the optional in-band window-size exchange, shared with kagent-ctl console
"""

from kagent.console.protocol import HELLO, InputFilter, encode_winsize, get_winsize, set_winsize
from kagent.console.server import CONSOLE_DEVICE, RESERVED_PORTS, DebugConsole
from kagent.console.shell import SHELLS, ShellProcess, find_shell, shell_entry, spawn_shell

__all__ = [
    "CONSOLE_DEVICE",
    "DebugConsole",
    "HELLO",
    "InputFilter",
    "RESERVED_PORTS",
    "SHELLS",
    "ShellProcess",
    "encode_winsize",
    "find_shell",
    "get_winsize",
    "set_winsize",
    "shell_entry",
    "spawn_shell",
]
