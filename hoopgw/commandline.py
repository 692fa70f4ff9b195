"""
What a shell command line runs, read the way a shell would read it, for
rules to match on: its simple commands (each an argv starting at the
program), the programs they run, and its pipelines.  It looks through
wrappers (C{sudo}, C{env}, C{timeout}, C{xargs} ...), into command lines a
shell is given as a string (C{sh -c}, C{su -c}, C{eval}, C{sudo -s}), and
into command and process substitutions (C{$(...)}, backquotes, C{<(...)}),
whose output feeds the command around them as a pipe would.

It is a guard rail, not a sandbox: a program named at run time (C{$X},
C{$(echo sudo)}) or an interpreter's own code (C{python -c}) is not seen.
Used by the SSH front end for exec requests and by the Kubernetes front end
for the argv of C{kubectl exec}.
"""

import os
import shlex

import attr


# Nesting and size limits: a line beyond them is reported as unreadable
# (and refused by block, as SQL that does not parse is).
MAX_DEPTH = 8
MAX_COMMANDS = 256

_PUNCTUATION = "();<>|&\n"
_RESERVED = frozenset(["!", "{", "}", "if", "then", "elif", "else", "fi", "do", "done", "while", "until", "case", "esac"])

# Shells, whose -c option takes a command line.
SHELLS = frozenset(["sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "yash", "fish", "rbash"])
# Shell options that take an argument (bash -o pipefail -c ...).
_SHELL_OPTIONS_WITH_ARGUMENT = frozenset(["-o", "+o", "-O", "+O", "--rcfile", "--init-file"])

# Programs that run another program given after their own options: the
# options that take an argument, and how many plain arguments come before
# the program (timeout's duration, chroot's folder).
WRAPPERS = {
    "sudo": (frozenset(["-u", "-g", "-C", "-D", "-h", "-p", "-R", "-r", "-T", "-t", "-U", "--user", "--group",
                        "--close-from", "--chdir", "--host", "--prompt", "--chroot", "--role", "--type",
                        "--command-timeout", "--other-user"]), 0),
    "doas": (frozenset(["-u", "-C"]), 0),
    "env": (frozenset(["-u", "-C", "--unset", "--chdir"]), 0),
    "nice": (frozenset(["-n", "--adjustment"]), 0),
    "nohup": (frozenset(), 0),
    "setsid": (frozenset(), 0),
    "time": (frozenset(["-f", "-o", "--format", "--output"]), 0),
    "command": (frozenset(), 0),
    "builtin": (frozenset(), 0),
    "exec": (frozenset(["-a"]), 0),
    "stdbuf": (frozenset(["-i", "-o", "-e", "--input", "--output", "--error"]), 0),
    "timeout": (frozenset(["-s", "-k", "--signal", "--kill-after"]), 1),
    "ionice": (frozenset(["-c", "-n", "-p", "-P", "-u", "--class", "--classdata"]), 0),
    "chroot": (frozenset(["--userspec", "--groups"]), 1),
    "xargs": (frozenset(["-a", "-d", "-E", "-I", "-L", "-n", "-P", "-s", "--arg-file", "--delimiter", "--eof",
                         "--replace", "--max-lines", "--max-args", "--max-procs", "--max-chars"]), 0),
    "busybox": (frozenset(), 0),
    "runuser": (frozenset(["-u", "-g", "-G", "--user", "--group", "--supp-group"]), 0),
    "strace": (frozenset(["-e", "-o", "-p", "-s", "-u"]), 0),
    "unbuffer": (frozenset(), 0),
    "caffeinate": (frozenset(), 0),
    "flock": (frozenset(["-w", "-E", "--timeout", "--conflict-exit-code"]), 1),
}
# Options after which a wrapper's remaining words are one command line
# for a shell (sudo -s CMD, watch CMD, env -S STRING, su -c STRING).
_LINE_OPTIONS = {
    "sudo": frozenset(["-s", "--shell", "-i", "--login"]),
    "env": frozenset(["-S", "--split-string"]),
}


class CommandLineError(ValueError):
    """
    A command line that cannot be read (unbalanced quotes, nested too
    deeply, too many commands).
    """


@attr.s(slots=True)
class CommandLine:
    """
    What a command line runs.

    @ivar commands: every simple command, as the argv that runs (from the
        program on, without assignments and redirections), in the order
        they appear; a wrapped or nested command follows its wrapper, a
        substitution's commands come before the command they feed.
    @ivar programs: the program of each of L{commands} (without folders).
    @ivar pipelines: each pipeline of two or more stages (including a
        substitution feeding the command around it), as a list of stages,
        each the programs that stage runs (a wrapper and what it wraps).
    @ivar error: why part of the line could not be read, or None.
    """

    commands = attr.ib(factory=list)
    programs = attr.ib(factory=list)
    pipelines = attr.ib(factory=list)
    error = attr.ib(default=None)

    def facts(self, clean=None):
        """
        The line's facts (C{commands}, C{programs}, C{pipelines} and
        C{parse_error} if any), each word passed through C{clean} (the
        caller's redaction).
        """
        clean = clean or (lambda word: word)
        facts = {
            "commands": [[clean(word) for word in argv] for argv in self.commands],
            "programs": [clean(program) for program in self.programs],
            "pipelines": [[[clean(program) for program in stage] for stage in pipeline] for pipeline in self.pipelines],
        }
        if self.error:
            facts["parse_error"] = self.error
        return facts


def program_name(word):
    """
    The program a word names, without its folder (C{/usr/bin/sudo} is
    C{sudo}).
    """
    return os.path.basename(word) or word


def parse(line):
    """
    Read a shell command line.

    @return: a L{CommandLine}; its C{error} says what could not be read.
    """
    result = CommandLine()
    try:
        _Reader(result).line(line, 0)
    except CommandLineError as error:
        result.error = str(error)
    return result


def parse_argv(argv):
    """
    Read an argv that runs without a shell (C{kubectl exec -- ...}): one
    simple command, looked through for wrappers and shells' C{-c}.
    """
    result = CommandLine()
    try:
        _Reader(result).simple(list(argv), 0)
    except CommandLineError as error:
        result.error = str(error)
    return result


def _placeholder(index):
    return "\x00%d\x00" % (index,)


def _substitutions(line):
    """
    Find command and process substitutions outside single quotes.

    @return: C{(line with each replaced by a placeholder, [(kind, inner
        text, whole text)])}: kind C{">"} for C{>(...)}, whose input the command
        around it writes; C{"<"} for the others, whose output it reads.
    """
    if "`" not in line and "$(" not in line and "<(" not in line and ">(" not in line:
        return line, []
    out = []
    found = []
    index = 0
    size = len(line)
    single = double = False
    while index < size:
        char = line[index]
        if single:
            if char == "'":
                single = False
            out.append(char)
            index += 1
            continue
        if char == "\\" and index + 1 < size:
            out.append(line[index : index + 2])
            index += 2
            continue
        if char == "'" and not double:
            single = True
        elif char == '"':
            double = not double
        elif char == "`":
            end = index + 1
            while end < size and line[end] != "`":
                end += 2 if line[end] == "\\" else 1
            found.append(("<", line[index + 1 : end], line[index : end + 1]))
            out.append(_placeholder(len(found) - 1))
            index = end + 1
            continue
        elif line.startswith("$(", index) or (not double and line.startswith(("<(", ">("), index)):
            end = _closing(line, index + 2)
            found.append((">" if char == ">" else "<", line[index + 2 : end], line[index : end + 1]))
            # Spaces keep a process substitution a word of its own after a
            # redirection (sh < <(curl ...)).
            out.append(_placeholder(len(found) - 1) if char == "$" else " %s " % (_placeholder(len(found) - 1),))
            index = end + 1
            continue
        out.append(char)
        index += 1
    return "".join(out), found


def _closing(line, start):
    """
    Where the parenthesis opened before C{start} closes (quotes inside
    respected), or the end of the line.
    """
    depth = 1
    index = start
    single = double = False
    while index < len(line):
        char = line[index]
        if single:
            single = char != "'"
        elif char == "\\":
            index += 1
        elif char == "'" and not double:
            single = True
        elif char == '"':
            double = not double
        elif not double and char == "(":
            depth += 1
        elif not double and char == ")":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return index


def _tokens(line):
    lexer = shlex.shlex(line, posix=True, punctuation_chars=_PUNCTUATION)
    lexer.whitespace_split = True
    lexer.commenters = ""
    # A newline separates commands, as ";" does.
    lexer.whitespace = " \t\r"
    try:
        return list(lexer)
    except ValueError as error:
        raise CommandLineError(str(error))


def _is_operator(token):
    return bool(token) and all(char in _PUNCTUATION for char in token)


def _is_assignment(word):
    name, equals, _ = word.partition("=")
    return bool(equals) and name.isidentifier()


class _Reader:
    def __init__(self, result):
        self.result = result

    def _count(self):
        if len(self.result.commands) >= MAX_COMMANDS:
            raise CommandLineError("the command line runs more than %d commands, too many to check" % (MAX_COMMANDS,))

    def line(self, line, depth):
        """
        Read one command line.

        @return: C{(first, last, every)}: the programs of the first stage
            of its first pipeline (what reads a substitution's input), of
            the last stage of its last (what a substitution's output comes
            from), and every program it runs.
        """
        if depth > MAX_DEPTH:
            raise CommandLineError("the command line nests commands more than %d levels deep" % (MAX_DEPTH,))
        before = len(self.result.programs)
        line, inner = _substitutions(line)
        pipeline = []
        words = []
        # Words that are a redirection's target: not arguments, but a
        # substitution there still feeds (or reads) the command.
        targets = []
        ends = [None, []]

        def end_command():
            if words or targets:
                numbers = [
                    number for number in range(len(inner))
                    if any(_placeholder(number) in word for word in words + targets)
                ]
                restored = [_restore(word, inner) for word in words]
                pipeline.append(self.simple(restored, depth, [inner[number][:2] for number in numbers]))
                del words[:]
                del targets[:]

        def end_pipeline():
            end_command()
            stages = [stage for stage in pipeline if stage]
            if len(stages) > 1:
                self.result.pipelines.append(stages)
            if stages:
                if ends[0] is None:
                    ends[0] = stages[0]
                ends[1] = stages[-1]
            del pipeline[:]

        redirect = False
        for token in _tokens(line):
            if _is_operator(token):
                if "<" in token or ">" in token:
                    redirect = True
                    continue
                core = token.replace("\n", "").lstrip(")")
                if core in ("|", "|&"):
                    end_command()
                else:
                    end_pipeline()
                continue
            if redirect:
                redirect = False
                targets.append(token)
                continue
            words.append(token)
        end_pipeline()
        return ends[0] or [], ends[1], self.result.programs[before:]

    def simple(self, words, depth, substitutions=()):
        """
        One simple command: record it, and whatever it wraps or nests.

        @param substitutions: C{(kind, text)} of the substitutions in its
            words: their output feeds this command (or, for C{>(...)}, this
            command's output feeds them), as a pipe would.
        @return: the programs this command runs.
        """
        start = 0
        while start < len(words) and (words[start] in _RESERVED or _is_assignment(words[start])):
            start += 1
        argv = words[start:]
        inner = [(kind, self.line(text, depth + 1)) for kind, text in substitutions]
        if not argv:
            return []
        self._count()
        program = program_name(argv[0])
        self.result.commands.append(argv)
        self.result.programs.append(program)
        programs = [program] + self._inside(program, argv, depth)
        for kind, (first, last, _) in inner:
            if kind == ">" and first:
                self.result.pipelines.append([programs, first])
            elif kind == "<" and last:
                self.result.pipelines.append([last, programs])
        return programs

    def _inside(self, program, argv, depth):
        """
        What a wrapper or a shell runs: the programs found in it.
        """
        arguments = argv[1:]
        if program in SHELLS:
            text = _shell_string(arguments)
            if text is not None:
                return self.line(text, depth + 1)[2]
            return []
        if program == "eval" and arguments:
            return self.line(" ".join(arguments), depth + 1)[2]
        if program in ("su", "runuser"):
            text = _option_value(arguments, ("-c", "--command"))
            if text is not None:
                return self.line(text, depth + 1)[2]
        if program == "watch":
            rest = _after_options(arguments, frozenset(["-n", "-d", "--interval", "--differences"]), 0)
            if rest:
                if "-x" in arguments or "--exec" in arguments:
                    return self.simple(rest, depth + 1)
                return self.line(" ".join(rest), depth + 1)[2]
            return []
        wrapper = WRAPPERS.get(program)
        if wrapper is None:
            return []
        with_argument, positional = wrapper
        line_options = _LINE_OPTIONS.get(program, frozenset())
        index = 0
        as_line = False
        while index < len(arguments):
            word = arguments[index]
            if word == "--":
                index += 1
                break
            if not word.startswith("-") or word == "-":
                if program in ("env", "sudo") and _is_assignment(word):
                    index += 1
                    continue
                if word == "-" and program == "env":
                    index += 1
                    continue
                break
            option = word.split("=", 1)[0]
            if option in line_options:
                as_line = True
            if option in with_argument and "=" not in word:
                index += 2
            else:
                index += 1
        index += positional
        rest = arguments[index:]
        if not rest:
            return []
        if as_line:
            return self.line(" ".join(rest), depth + 1)[2]
        return self.simple(rest, depth + 1)


def _restore(word, inner):
    if "\x00" not in word:
        return word
    for number, (_, _, whole) in enumerate(inner):
        word = word.replace(_placeholder(number), whole)
    return word


def _shell_string(arguments):
    """
    The command string of C{sh -c STRING}, or None when the shell runs a
    script or reads its input.
    """
    string_follows = False
    index = 0
    while index < len(arguments):
        word = arguments[index]
        if word == "--":
            index += 1
            break
        if word in _SHELL_OPTIONS_WITH_ARGUMENT:
            index += 2
            continue
        if word.startswith("--"):
            index += 1
            continue
        if word[:1] in ("-", "+") and len(word) > 1:
            if "c" in word[1:] and word[0] == "-":
                string_follows = True
            index += 1
            continue
        break
    if string_follows and index < len(arguments):
        return arguments[index]
    return None


def _option_value(arguments, names):
    for index, word in enumerate(arguments):
        for name in names:
            if word == name and index + 1 < len(arguments):
                return arguments[index + 1]
            if name.startswith("--") and word.startswith(name + "="):
                return word[len(name) + 1 :]
    return None


def _after_options(arguments, with_argument, positional):
    index = 0
    while index < len(arguments) and arguments[index].startswith("-"):
        index += 2 if arguments[index] in with_argument else 1
    return arguments[index + positional :]
