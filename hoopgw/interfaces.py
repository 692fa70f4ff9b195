"""
The interfaces hoopgw's parts meet at: addon factories (the plugin
interface), addons (found by method name, as in mitmproxy) and stores.
"""

from zope.interface import Attribute, Interface


class IAddonFactory(Interface):
    """
    A loadable enforcement step.  Built-ins and third-party addons provide
    this as module-level objects in C{hoopgw.plugins} (Twisted plugins) or
    in a Python file named by path in the configuration.
    """

    name = Attribute("The name the configuration uses for this addon.")
    description = Attribute("One sentence saying what the addon does.")
    options = Attribute("A sequence of L{hoopgw.options.Option}: what the addon accepts.")

    def build(options, context):
        """
        Make the addon for one connection.

        @param options: the validated options, a mapping of option name to value.
        @param context: the L{hoopgw.gateway.AddonContext}: the gateway's
            store, identity providers, approvals broker, clock, and the
            connection's configuration.
        @return: an object with any subset of the L{IAddon} hooks.
        """


class IAddon(Interface):
    """
    The hooks an addon may implement; the chain calls those it finds, by
    name, in chain order.  Every hook may return a L{Deferred}.  An addon
    that raises denies the session or command: the chain fails closed.
    """

    name = Attribute("The addon's name, as in the configuration.")

    def session_started(session):
        """
        A client connected and presented credentials.

        @return: a L{hoopgw.model.Decision}, or L{None} for no opinion.
            The identity addon sets C{session.identity} here.
        """

    def command_received(session, command):
        """
        The client asked for C{command}; C{command.decision} holds the
        decision so far.

        @return: a L{hoopgw.model.Decision}, or L{None} for no opinion.
        """

    def result_received(session, command, chunk):
        """
        A piece of the target's answer to C{command} is on its way to the
        client.

        @param chunk: a L{hoopgw.model.ResultChunk}, to be modified in place.
        """

    def command_finished(session, command):
        """
        C{command} is over: C{command.decision} is final and
        C{command.outcome} says what happened.  Also called for commands
        that were denied before reaching this addon.
        """

    def session_ended(session):
        """
        The session is over (also when it was refused:
        C{session.refusal} then holds the decision).
        """


class IStore(Interface):
    """
    The append-only, hash-chained evidence store.
    """

    def append(event, urgent=True):
        """
        Chain and persist C{event} (a JSON-serialisable mapping with at
        least C{"type"}).

        @param urgent: something waits for this event to be durable (a
            command about to run: write-ahead).  When C{False} (a command's
            end, which nothing waits on), the store may make it durable
            with the next urgent event's sync, within a short delay.

        @return: a L{Deferred} that fires with the chained event (with its
            C{seq}, C{prev} and C{hash}) once it is durable, or fails if it
            could not be made durable.
        """

    def write_attachment(name, data):
        """
        Store a named blob (an asciicast) beside the events.

        @return: a L{Deferred} firing with the blob's SHA-256 hex digest.
        """

    def close():
        """
        Flush and close.  @return: a L{Deferred}.
        """
