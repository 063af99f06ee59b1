"""`tinyllama chat`: the terminal side of a ChatSession (engine.generation.chat).

On a terminal: a banner, a `>>> ` prompt with readline line editing and history, replies streamed token by token,
Ctrl-C stops a reply (or clears the line at the prompt), Ctrl-D or /exit quits. With stdin a pipe or a file: one
user message (or command) per line, only the replies (and what commands are asked to show) on stdout, exit 0 at EOF.
Notices (dropped turns, a stopped reply, errors) go to stderr in both modes.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys

from engine.cli.common import NO_TEMPLATE_HINT, chat_template_of, load, sampling_overrides, speculation_options
from engine.generation.chat import SETTABLE, ChatSession
from engine.generation.draft_payoff import describe
from engine.errors import EngineError

PROMPT = ">>> "
HISTORY_ENV = "TINYLLAMA_CHAT_HISTORY"  # readline history file ('' : none); default ~/.tinyllama_chat_history
COMMANDS = ("/help", "/reset", "/system", "/set", "/stats", "/save", "/load", "/exit", "/quit")
HELP = f"""\
Commands:
  /help               this list
  /reset              forget the conversation (the system prompt stays)
  /system [TEXT]      show the system prompt, or set it ('/system -' removes it)
  /set [NAME VALUE]   show the sampling settings, or change one ('none' restores the default):
                      {', '.join(SETTABLE)}
  /stats              statistics of the last reply (prefill and context tokens, speed)
  /save FILE          write the conversation to FILE (JSON: system prompt + messages)
  /load FILE          continue a conversation saved with /save
  /exit               quit (also /quit or Ctrl-D)
Ctrl-C stops a reply (the part already written stays in the conversation) or clears the line.
A line starting with // sends the rest, beginning with /, as a message."""


def run_chat(args) -> int:
    """The `chat` subcommand: load the model, then talk until EOF or /exit -> exit status."""
    speculation = speculation_options(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    chat_template_of(args)  # a bad --chat-template fails before the model loads
    model = load(args)
    if model.tokenizer.chat_template is None:
        raise EngineError(f"{args.model} has no chat template, so it cannot chat: {NO_TEMPLATE_HINT}; or use "
                          "`tinyllama generate` for plain text completion")
    session = ChatSession(model, system=args.system, max_new_tokens=args.max_new_tokens,
                          stop=args.stop or None, **speculation, **sampling_overrides(args))
    return Repl(session, interactive=interactive, name=args.model).run()


class Repl:
    """Reads lines, runs commands, streams replies. interactive: a terminal (prompt, banner, readline)."""

    def __init__(self, session: ChatSession, interactive: bool, name: str = "", stdin=None, stdout=None, stderr=None):
        self.session = session
        self.interactive = interactive
        self.name = name
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self._history_file = None

    # ---- output -------------------------------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        """Output the user asked for (a reply, /stats, /help): stdout."""
        self.out.write(text + "\n")
        self.out.flush()

    def notice(self, text: str) -> None:
        """Everything else (confirmations, warnings): stderr, so piped stdout holds only the replies."""
        self.out.flush()
        self.err.write(text + "\n")
        self.err.flush()

    def error(self, text) -> None:
        """Report `text` on stderr as 'error: text'."""
        self.notice(f"error: {text}")

    # ---- input --------------------------------------------------------------------------------------------------
    def read_line(self) -> str:
        """The next line; EOFError at the end (Ctrl-D), KeyboardInterrupt for Ctrl-C at the prompt."""
        if self.interactive:
            return input(PROMPT)
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def setup_readline(self) -> None:
        """Load the readline history file and bind Tab to command completion; nothing without readline."""
        try:
            import readline
        except ImportError:  # e.g. Windows without pyreadline: input() still works, without editing
            return
        path = os.environ.get(HISTORY_ENV, os.path.join(os.path.expanduser("~"), ".tinyllama_chat_history"))
        if path:
            try:
                readline.read_history_file(path)
            except OSError:
                pass
            readline.set_history_length(1000)
            self._history_file = path

        def complete(text, state):
            """readline completer: the state-th command (plus a space) starting with `text`, or None."""
            matches = [c + " " for c in COMMANDS if c.startswith(text)] if text.startswith("/") else []
            return matches[state] if state < len(matches) else None

        readline.set_completer(complete)
        readline.set_completer_delims(" \t\n")
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")

    def save_readline_history(self) -> None:
        """Write the readline history file, if one was set up; errors are ignored."""
        if self._history_file:
            try:
                import readline

                readline.write_history_file(self._history_file)
            except (ImportError, OSError):
                pass

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> int:
        """The loop: a banner (interactive), then one line at a time until EOF or /exit -> exit status 0."""
        if self.interactive:
            self.setup_readline()
            s = self.session
            self.say(f"tinyllama chat: {self.name} ({s.window}-token window). "
                     "/help for commands, Ctrl-D or /exit to quit.")
        try:
            while True:
                try:
                    line = self.read_line()
                except EOFError:
                    if self.interactive:
                        self.say()
                    return 0
                except KeyboardInterrupt:
                    if not self.interactive:
                        raise
                    self.say()  # like a shell: drop the line, new prompt
                    continue
                try:
                    if not self.handle(line):
                        return 0
                except KeyboardInterrupt:
                    if not self.interactive:
                        raise
                    self.say()
        finally:
            self.save_readline_history()

    def handle(self, line: str) -> bool:
        """Run one input line; False to quit."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("//"):
            self.reply(text[1:])
            return True
        if text.startswith("/"):
            try:
                return self.command(text)
            except EngineError as e:
                self.error(e)
                return True
        self.reply(line)
        return True

    def command(self, text: str) -> bool:
        """Run one /command line; False for /exit or /quit; EngineError for an unknown command or bad usage."""
        name, _, rest = text.partition(" ")
        rest = rest.strip()
        name = name.lower()
        s = self.session
        if name in ("/exit", "/quit"):
            return False
        if name in ("/help", "/?"):
            self.say(HELP)
        elif name == "/reset":
            s.reset()
            self.notice("(conversation cleared" + ("; the system prompt stays)" if s.system else ")"))
        elif name == "/system":
            if not rest:
                self.say(s.system if s.system else "(no system prompt)")
            else:
                s.set_system(None if rest == "-" else rest)
                self.notice("(system prompt removed)" if rest == "-" else "(system prompt set)")
        elif name == "/set":
            if not rest:
                for key, value in s.settings().items():
                    self.say(f"{key} = {value}")
                return True
            parts = rest.split(None, 1)
            if len(parts) != 2:
                raise EngineError("usage: /set NAME VALUE (see /help)")
            value = s.set_option(parts[0], parts[1])
            key = parts[0].lower().replace("-", "_")
            self.notice(f"({key} = {s.settings()[key] if value is None else value})")
        elif name == "/stats":
            self.show_stats()
        elif name in ("/save", "/load"):
            path = self.path_argument(rest, name)
            if name == "/save":
                s.save(path)
                self.notice(f"(saved {len(s.messages)} messages to {path})")
            else:
                s.load(path)
                self.notice(f"(loaded {len(s.messages)} messages from {path})")
        else:
            raise EngineError(f"unknown command {name}; /help lists the commands")
        return True

    @staticmethod
    def path_argument(rest: str, name: str) -> str:
        """The FILE of /save or /load: `rest` unquoted if it is one shell word, else as typed; EngineError if empty."""
        if not rest:
            raise EngineError(f"usage: {name} FILE")
        try:
            parts = shlex.split(rest)
        except ValueError:
            parts = [rest]
        return parts[0] if len(parts) == 1 else rest

    def show_stats(self) -> None:
        """Print the last turn's TurnStats (prefill and context tokens, speeds, stop reason), or 'no reply yet'."""
        st = self.session.stats
        if st is None:
            self.say("no reply yet")
            return
        self.say(f"prefill tokens: {st.prefill_tokens} (of the {st.prompt_tokens}-token prompt; "
                 f"{st.reused_tokens} re-used from the cache)")
        self.say(f"context tokens: {st.context_tokens} of {self.session.window}")
        self.say(f"time to first token: {st.time_to_first_token:.3f} s (prefill {st.prompt_tokens_per_s:.1f} tok/s)")
        self.say(f"generated tokens: {st.generated_tokens} at {st.generated_tokens_per_s:.2f} tok/s "
                 f"(stop: {st.stop_reason})")
        if st.dropped_turns:
            self.say(f"dropped turns: {st.dropped_turns}")
        if st.draft_steps or st.plain_steps:
            self.say("speculative: " + describe(st.draft_tokens, st.accepted_draft_tokens, st.draft_steps,
                                                st.plain_steps))

    # ---- a reply ------------------------------------------------------------------------------------------------
    def reply(self, text: str) -> None:
        """Send `text` as a user message and stream the reply to stdout; Ctrl-C stops it, notices go to stderr."""
        s = self.session
        try:
            turn = s.send(text)
        except EngineError as e:
            self.error(e)
            return
        if turn.dropped_turns:
            n = turn.dropped_turns
            self.notice(f"(the conversation outgrew the {s.window}-token window: dropped the oldest "
                        f"{n} turn{'s' if n != 1 else ''}" + ("; the system prompt stays)" if s.system else ")"))
        presses = [0]

        def on_sigint(signum, frame):
            """SIGINT handler during a reply: count the press; from the second one on raise KeyboardInterrupt."""
            presses[0] += 1
            if presses[0] > 1:  # a second Ctrl-C: stop even inside a long prefill
                raise KeyboardInterrupt

        try:
            previous = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
            previous = None
        started = False
        try:
            for event in turn:
                piece = event.text
                if not started:
                    piece = piece.lstrip()  # the reply's first token usually carries a leading space
                    started = bool(piece)
                if piece:
                    self.out.write(piece)
                    self.out.flush()
                if presses[0]:
                    turn.cancel()
                    break
        except KeyboardInterrupt:
            pass
        except EngineError as e:
            self.out.write("\n")
            self.error(e)
            return
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        self.out.write("\n")
        self.out.flush()
        stop = turn.result.stop_reason if turn.result is not None else None
        if presses[0] or stop == "cancelled":
            self.notice("(reply stopped; what was written stays in the conversation)")
        elif stop == "context_full":
            self.notice("(the context window is full; the oldest turns will be dropped next turn)")
        elif stop == "max_new_tokens" and self.interactive:
            self.notice(f"(reply cut at max_new_tokens = {s.settings()['max_new_tokens']}; "
                        "/set max_new_tokens N for longer replies)")
