"""
What SSH clients ask for, as protocol-neutral L{Command}s with the facts
policies match on: an exec command line split into argv and read as a
shell would (its simple commands, programs and pipelines), a shell, an
sftp operation, a port forward, a refused request.  Every fact that could hold a secret or a
card number is redacted, because facts are recorded.
"""

import shlex

from hoopgw import commandline
from hoopgw.model import Command
from hoopgw.redact import redact_text


def _clean(text):
    # Masked before the bytes that are not UTF-8 are escaped: an escape's
    # hex digits next to a card number would hide it in a longer number.
    return _utf8(redact_text(text)[0])


def _utf8(text):
    """
    C{text} as valid UTF-8 text: the bytes of a line that was not UTF-8
    (read with C{surrogateescape}) as C{\\xNN} escapes, so the record can
    hold it and shows which bytes they were.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _program_name(argv):
    """
    The program a simple command runs: its first word after any leading
    C{NAME=value} assignments, without its folder.
    """
    for word in argv:
        name, equals, _ = word.partition("=")
        if equals and name.isidentifier():
            continue
        return commandline.program_name(word)
    return ""


def exec_command(line, login, pty):
    """
    An exec request: C{line} is the command line as the client sent it
    (kept as L{Command.text}, never recorded); the facts give the argv
    (shlex), the program, and what the line runs as a shell reads it
    (L{hoopgw.commandline}: every simple command, program and pipeline,
    also behind sudo or inside sh -c), so a rule can refuse C{sudo},
    C{rm -rf /} or C{curl ... | sh}.
    """
    facts = {"login": login, "pty": pty}
    try:
        argv = shlex.split(line)
    except ValueError:
        argv = None
    read = commandline.parse(line)
    facts["argv"] = [_clean(word) for word in argv] if argv is not None else None
    facts["program"] = _clean(argv[0]) if argv else ""
    facts["program_name"] = _program_name([_clean(word) for word in argv]) if argv else ""
    # Unbalanced quotes: the target's shell would refuse the line too; it
    # says why in parse_error, and block refuses it.
    facts.update(read.facts(_clean))
    if "parse_error" in facts:
        facts["parse_error"] = _clean(facts["parse_error"])
    return Command(kind="exec", text=line, redacted=_clean(line), facts=facts)


def shell_command(login, pty, term=None):
    facts = {"login": login, "pty": pty}
    if term:
        facts["term"] = term
    return Command(kind="shell", text="shell", redacted="shell", facts=facts)


def sftp_command(operation, path=None, **facts):
    """
    One sftp operation (the session itself is C{operation="start"}).
    """
    text = "sftp %s" % (operation,)
    all_facts = {"operation": operation}
    if path is not None:
        all_facts["path"] = _clean(path)
        text += " " + path
    for name, value in facts.items():
        all_facts[name] = _clean(value) if isinstance(value, str) else value
        if name in ("target", "access") and isinstance(value, str):
            text += " %s" % (value,)
    return Command(kind="sftp", text=text, redacted=_clean(text), facts=all_facts)


def forward_command(host, port, originator_host, originator_port):
    text = "direct-tcpip %s:%d" % (host, port)
    return Command(
        kind="forward",
        text=text,
        redacted=_clean(text),
        facts={
            "direction": "local",
            "host": _clean(host),
            "port": port,
            "originator": _clean("%s:%d" % (originator_host, originator_port)),
        },
    )


def refused_request(request, text, **facts):
    """
    A request the gateway never allows (agent or X11 forwarding, remote
    forwarding, another subsystem), recorded when tried.
    """
    all_facts = {"request": request}
    all_facts.update((name, _clean(value) if isinstance(value, str) else value) for name, value in facts.items())
    return Command(kind="ssh-request", text=text, redacted=_clean(text), facts=all_facts)
