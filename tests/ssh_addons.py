"""
Small real addons the SSH tests load by path, as an operator would: a
stream masker that holds card digits back across chunks, a policy that
denies, approves later (a Deferred the test fires) or refuses sftp
uploads by path, and a result hook that fails.  The block, approve and mask built-ins come from other
work; these prove the SSH front end drives such addons correctly.
"""

from twisted.internet import defer

from hoopgw import masking
from hoopgw import options as o
from hoopgw.addon import AddonFactory
from hoopgw.model import Decision


class StreamMask:
    """
    Mask card numbers in output streams, also when one is split across chunks.
    """

    name = "test-stream-mask"
    options = ()

    def __init__(self, options, context):
        self.held_back = 0

    def result_received(self, session, command, chunk):
        if chunk.kind != "stream":
            return
        maskers = command.metadata.setdefault("test-stream-mask", {})
        masker = maskers.get(chunk.stream)
        if masker is None:
            masker = maskers[chunk.stream] = masking.StreamMasker()
        chunk.data, count = masker.feed(chunk.data, final=chunk.final)
        chunk.masked += count
        self.held_back = max(self.held_back, len(masker.held))


class Policy:
    """
    Deny, hold for approval or refuse uploads, as the options say.
    """

    name = "test-policy"
    options = (
        o.Option("deny_programs", o.string_list, [], "Programs whose exec is denied."),
        o.Option("approve_programs", o.string_list, [], "Programs whose exec waits for the test to decide."),
        o.Option("deny_upload_prefix", o.string, None, "Refuse sftp opens for writing under this path."),
        o.Option("slow", o.boolean, False, "Answer every command after a reactor turn."),
    )

    def __init__(self, options, context):
        self.options = options
        self.reactor = context.reactor
        self.waiting = []

    def command_received(self, session, command):
        facts = command.facts
        if command.kind == "exec":
            programs = set(facts.get("programs") or [])
            denied = programs & set(self.options["deny_programs"])
            if denied:
                return Decision.deny("%s is not allowed" % (", ".join(sorted(denied)),), rule="test:deny-program")
            if programs & set(self.options["approve_programs"]):
                session.notify("waiting for a human to approve %r" % (command.redacted,))
                pending = defer.Deferred()
                self.waiting.append((command, pending))
                return pending
        prefix = self.options["deny_upload_prefix"]
        if (
            prefix
            and command.kind == "sftp"
            and facts.get("transfer") == "upload"
            and facts.get("path", "").startswith(prefix)
        ):
            return Decision.deny("uploads to %s are not allowed" % (prefix,), rule="test:deny-upload")
        if self.options["slow"]:
            answer = defer.Deferred()
            self.reactor.callLater(0, answer.callback, None)
            return answer
        return None


class ExplodingResults:
    """
    Fail on output that says "explode", as a broken masker would.
    """

    name = "test-exploding-results"
    options = ()

    def __init__(self, options, context):
        pass

    def result_received(self, session, command, chunk):
        if b"explode" in chunk.data:
            raise RuntimeError("the masker broke")


stream_mask = AddonFactory(StreamMask)
exploding_results = AddonFactory(ExplodingResults)
policy = AddonFactory(Policy)
