"""Small utilities shared by the scripts: user-facing errors, atomic file writes, device and dtype
resolution, checkpoint files and RNG state.

Every script ends with `run_cli(main)`, so a mistake the user can fix (a wrong
flag, a missing file) prints one line on stderr and exits with code 2 instead
of a traceback.
"""
import argparse
import contextlib
import difflib
import errno
import multiprocessing
import multiprocessing.connection
import os
import re
import shlex
import stat
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import IO, Callable, Iterator, Optional

from tqdm import tqdm


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it; done once, at import, before any thread
    os.umask(umask)
    return umask


_UMASK = _read_umask()


class UserError(Exception):
    """A mistake the user can fix. The message says what was wrong and what would work.

    per_process: under torchrun, whether only the process that raised it may know (one rank's batch);
    otherwise every process of a machine meets the same error, and one of them says it.
    """
    per_process = False


def underscored(arg: str) -> str:
    """'--max-new-tokens=5' -> '--max_new_tokens=5': this project's flags are its fields' names, with underscores.
    An argument that is no --flag, and the value after '=', stay as they are."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return f"--{name.replace('-', '_')}{sep}{value}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError (error_type): one line on stderr and exit code 2 under
    run_cli, instead of the whole usage text."""
    error_type = UserError

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            # --max-new-tokens for --max_new_tokens: the flags are the config's field names, with underscores
            flags = {o for a in self._actions for o in a.option_strings if o.startswith("--")}
            listed = message.removeprefix("unrecognized arguments: ").split(";")[0]  # not a caller's own advice
            typed = dict.fromkeys(a.split("=", 1)[0] for a in listed.split())
            meant = [underscored("--" + t.lstrip("-")) for t in typed if t.startswith("--") and "-" in t[2:]]
            if meant := [m for m in meant if m in flags]:
                head, sep, advice = message.partition(";")  # said beside the arguments, before a caller's advice
                message = f"{head} (did you mean {', '.join(meant)}?){sep}{advice}"
        raise self.error_type(f"{message}; see {self.prog} --help")


def path_arg(value: str) -> str:
    """argparse type of a file or folder flag: ~ expanded, and an empty value (a shell variable that was not
    set: --json "$OUT") refused instead of read as the flag left out."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; give the name of a file or folder")
    return os.path.expanduser(value)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default, except where there is none (None) or the help text already
    says what it is; descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def exit_with_parent(interval: float = 1.0) -> None:
    """In a worker process: end it as soon as the process that started it is gone.

    A pool's workers wait for work on a pipe whose writing end every sibling inherited too, so when the
    parent is killed outright (SIGKILL, the out-of-memory killer) none of them ever reads end-of-file
    and they would wait forever. An orphan is adopted by init or a subreaper, which changes its
    parent's pid on Linux and macOS: a daemon thread looks for that change every `interval` seconds.
    """
    parent = os.getppid()
    # Windows keeps an orphan's parent pid as it was; there the parent's sentinel (a process handle; a pipe
    # that only the parent writes to, under spawn) says it is gone. A forked worker's sentinel pipe is held
    # open by the siblings forked after it too, so the pid stays the test that works everywhere else
    sentinel = getattr(multiprocessing.parent_process(), "sentinel", None)

    def watch() -> None:
        while os.getppid() == parent:
            if sentinel is None:
                time.sleep(interval)
            elif multiprocessing.connection.wait([sentinel], timeout=interval):
                break
        os._exit(1)  # nothing is left to report to, and the parent's exit already dropped the unit

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def start_process_helpers() -> None:
    """Start multiprocessing's helper processes now, with SIGHUP ignored; for a script that will use worker
    processes, before anything makes a lock or a pool (tqdm makes a lock).

    Where workers are spawned (macOS, Windows) or come from a fork server (Python 3.14's default on Linux),
    multiprocessing starts a resource tracker, and maybe the fork server, the first time it needs them. A
    SIGHUP to the process group (the terminal closed) would kill them, with a screen of tracebacks, while
    the script itself stops cleanly. Started here, they inherit SIGHUP ignored; they ignore Ctrl-C already.
    """
    import signal
    hup = getattr(signal, "SIGHUP", None)  # none on Windows
    method = multiprocessing.get_start_method()
    if hup is None or method == "fork":  # forked workers need neither helper
        return
    previous = signal.signal(hup, signal.SIG_IGN)
    try:
        from multiprocessing import forkserver, resource_tracker
        resource_tracker.ensure_running()
        if method == "forkserver":
            forkserver.ensure_running()
    finally:
        signal.signal(hup, previous)


@contextlib.contextmanager
def stop_signals_raise(exception: Callable[[int], BaseException]) -> Iterator[Callable[[], None]]:
    """Inside the block, each of stop_signals() raises exception(signum) where the main thread stands, as Ctrl-C
    raises KeyboardInterrupt, instead of ending the process at once: cleanups run. The handlers that were there
    are given back after (a handler installed inside the block in turn gives this one back).

    Yields check(), which raises the exception again if a signal came: Python drops an exception raised where it
    cannot go on (in a fork's own callbacks, a __del__), so a long job calls it between its stages. An error that
    leaves the block after a signal came gives way to the signal's stop: the signal may be its cause (sent to the
    whole group, it also ends a pool worker still starting, before the worker ignores it, and the pool breaks)."""
    import signal
    received: list[int] = []

    def check() -> None:
        if received:
            raise exception(received[0])
    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's to set
        yield check
        return

    def handle(signum, frame):
        received.append(signum)
        raise exception(signum)
    previous = {sig: signal.signal(sig, handle) for sig in stop_signals()}
    try:
        yield check
    except Exception:
        check()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def become_pool_worker() -> None:
    """In a pool's worker process: Ctrl-C, SIGTERM and SIGHUP (sent to the whole process group by a terminal, a
    scheduler or a dropped SSH connection) are left to the parent, which ends the pool its own way, and the worker
    ends when the parent is gone (exit_with_parent). A SIGHUP that nohup ignores stays ignored."""
    import signal
    for sig in (signal.SIGINT, *stop_signals()):
        signal.signal(sig, signal.SIG_IGN)
    exit_with_parent()


class HeldSignals:
    """From hold() to the end of the with block, Ctrl-C, SIGTERM and SIGHUP wait: files renamed into place
    together are not cut between two renames. A signal that came is raised again as the block ends, to the
    handlers that were there; `note` is printed then if the block itself succeeded."""

    def __init__(self, note: str = ""):
        self.note, self.held, self._previous = note, [], {}

    def __enter__(self) -> "HeldSignals":
        return self

    def hold(self) -> None:
        import signal
        if self._previous or threading.current_thread() is not threading.main_thread():  # the main thread's to set
            return
        for sig in (signal.SIGINT, *stop_signals()):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # a background job's Ctrl-C stays ignored
                # recorded one by one: a signal between two of these still finds each handler given back
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, lambda signum, frame: self.held.append(signum))

    def __exit__(self, exc_type, *exc) -> None:
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self.held:
            if exc_type is None and self.note:
                print(f"note: {self.note}", file=sys.stderr)
            signal.raise_signal(self.held[0])


def stop_signals() -> list[int]:
    """The signals besides Ctrl-C that a long run turns into a clean stop: SIGTERM (kill, a scheduler) and
    SIGHUP (the terminal closed, the SSH connection dropped), which otherwise kill at once. SIGHUP only where
    it exists and is not ignored already, as `nohup` does for a run that is meant to outlive the terminal."""
    import signal
    hup = getattr(signal, "SIGHUP", None)
    return [signal.SIGTERM] + ([hup] if hup is not None and signal.getsignal(hup) is not signal.SIG_IGN else [])


def _interrupted_while_starting(signum, frame) -> None:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


def quiet_ctrl_c_while_starting() -> None:
    """Until run_cli starts main(), Ctrl-C ends the script as run_cli would: "interrupted" on stderr and exit
    code 130, instead of a traceback from the middle of `import torch` (a second, several on a cold disk). The
    scripts that import torch call it before that import, when run as programs. A Ctrl-C that is ignored (a job
    that a shell script started with `&`) stays ignored."""
    import signal
    if (threading.current_thread() is threading.main_thread()  # handlers are the main thread's to set
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def utf8_text(text: str) -> str:
    """text with each lone surrogate as U+FFFD. A path in bytes that are not UTF-8 (a GBK file name) reaches
    Python as such surrogates, which libraries that write UTF-8 (TensorBoard) refuse with a traceback."""
    try:  # the bytes of the file name, each that is not UTF-8 as one U+FFFD
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (a JSON escape)
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


# the first bytes of compressed files: those of gzip, xz and zstd hold a byte that cannot start a UTF-8 character;
# bzip2's and zip's are letters, so more of them is matched (bzip2: the block size, then a block's magic number)
COMPRESSED_MAGIC = ((re.compile(rb"\x1f\x8b"), "gzip"), (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2"),
                    (re.compile(rb"\xfd7zXZ\x00"), "xz"), (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd"),
                    (re.compile(rb"PK\x03\x04"), "zip"))
# a Parquet file (OpenWebText's shards on the Hub) begins with these four bytes
PARQUET_MAGIC = b"PAR1"

# how much of a file's start binary_problem looks at
BINARY_HEAD = 1 << 16


def _tar_header(head: bytes) -> bool:
    """Whether head starts with a tar header: its magic at byte 257 (POSIX 'ustar\\0', GNU 'ustar  \\0') and
    its checksum, the sum of the header's 512 bytes with the checksum's own 8 read as spaces. Text with
    "mustard" at byte 256 is no archive."""
    if len(head) < 512 or head[257:263] not in (b"ustar\x00", b"ustar "):
        return False
    try:
        checksum = int(head[148:156].strip(b" \x00") or b"x", 8)
    except ValueError:
        return False
    return checksum == sum(head[:148]) + 8 * 32 + sum(head[156:512])


def binary_problem(head: bytes | memoryview) -> Optional[str]:
    """Why a file that begins with head is no text, though it may be valid UTF-8 (a NUL byte is): UTF-16
    without a byte-order mark (English in it: a NUL beside each letter), a tar archive, a data set's train.bin.
    None for text, a few stray NULs included. The answer says what to do, after "FILE is not text: "."""
    head = bytes(head[:BINARY_HEAD])
    if _tar_header(head):
        return "it is a tar archive: extract it first (tar -xf FILE)"
    # documents whose text is inside a format (a PDF begins in ASCII, so it would be taken for GBK text)
    if head.startswith(b"%PDF-"):
        return "it is a PDF: extract its text first, e.g. `pdftotext -enc UTF-8 FILE OUT.txt` (poppler-utils)"
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):  # OLE2, the container of Office 97-2003 files
        return "it is an old Microsoft Office file (.doc, .xls, .ppt): save it as plain text (UTF-8) first"
    if head.startswith(b"PK\x03\x04") and head[30:58] == b"mimetypeapplication/epub+zip":  # its first entry
        return "it is an EPUB e-book: convert it to text first, e.g. `ebook-convert FILE OUT.txt` (calibre)"
    if head.startswith(b"PK\x03\x04") and b"[Content_Types].xml" in head[:4096]:  # Office Open XML's zip
        return ("it is a Microsoft Office file (.docx, .xlsx, .pptx): save it as plain text (UTF-8) first, e.g. "
                "`pandoc FILE -t plain -o OUT.txt` for a .docx")
    if head.startswith(b"PK\x03\x04") and b"data.pkl" in head[:128]:  # torch.save writes a zip, data.pkl first
        return "it is a PyTorch file (what torch.save writes, such as a checkpoint)"
    # UTF-16 with its byte-order mark, compressed files and Parquet are never UTF-8: decode_utf8 names them
    if (head[:2] in (b"\xff\xfe", b"\xfe\xff") or head.startswith(PARQUET_MAGIC)
            or any(magic.match(head) for magic, _ in COMPRESSED_MAGIC)):
        return None
    try:  # nor is what is not UTF-8 at all (Chinese in UTF-16, UTF-32): decode_utf8 says how to convert it
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if not (e.reason == "unexpected end of data" and e.end == len(head)):  # not a character cut at the end
            return None
    nuls = head.count(0)
    if nuls < 16 or nuls * 100 < len(head):  # under 1%: stray NULs in a text, which tokenise as any character
        return None
    even, odd = head[0::2].count(0), head[1::2].count(0)
    # every other byte: UTF-16 of Latin letters is half NULs; of Russian prose, a NUL at 15-19% of those places
    # (a space or an ASCII sign each); the NULs of other binary files fall on both sides alike
    if max(even, odd) >= 0.05 * len(head) / 2 and max(even, odd) > 10 * min(even, odd):
        order = "le" if odd > even else "be"
        return (f"{nuls:,} of its first {len(head):,} bytes are NULs, every other byte: it looks like UTF-16 "
                f"without a byte-order mark (what Windows Notepad calls 'Unicode'), so convert it with "
                f"`iconv -f utf-16{order} -t utf-8 IN > OUT`; or it is a binary file, such as a data set's train.bin")
    return (f"{nuls:,} of its first {len(head):,} bytes are NULs: it is a binary file (a data set's .bin, a "
            f"model, an archive)")


# this many characters beyond ASCII, read as UTF-8 before a byte that is not, say that the text is UTF-8 with damaged
# bytes: text in GBK, say, fails within a character or two (about one pair of its bytes in 12 reads as UTF-8)
UTF8_EVIDENCE = 8
def utf8_evidence(data: bytes | memoryview, at_most: int = UTF8_EVIDENCE) -> int:
    """The characters beyond ASCII in data's longest prefix that is UTF-8, counted up to at_most: what a
    piece tells of the file it comes from. Readers call it on each piece until a file has given at_most,
    so ASCII costs one isascii() and other text one decode."""
    data = bytes(data)  # the same object for bytes
    if at_most <= 0 or data.isascii():
        return 0
    try:
        text = str(data, "utf-8")
    except UnicodeDecodeError as e:
        text = str(data[: e.start], "utf-8")
    return min(len(text) - len(text.encode("ascii", "ignore")), at_most)


GBK_EVIDENCE = 8  # Chinese characters that GBK reads where UTF-8 fails, to say the encoding may change there


def gbk_reading(data: bytes | memoryview, window: int = 4096) -> Optional[str]:
    """The text of data's first `window` bytes read as GBK, where it holds GBK_EVIDENCE Chinese characters at
    least and fails as UTF-8 as often (a character cut by the window's end aside), else None: where a UTF-8 file
    stops being UTF-8, a GBK file joined to it, and not a few damaged bytes. (UTF-8 Chinese itself mostly reads as
    GBK too, as mojibake: the UTF-8 failures tell them apart.) Other double-byte encodings (Shift-JIS, EUC-KR) and
    Latin-1 can read as GBK too, so the caller shows the reading rather than vouching for it."""
    chunk = bytes(data[:window])
    if str(chunk, "utf-8", errors="replace").count("\ufffd") < GBK_EVIDENCE:
        return None
    try:
        text = chunk.decode("gbk")
    except UnicodeDecodeError as e:
        if e.start < len(chunk) - 1:  # not only the last byte, a character the window cuts
            return None
        text = chunk[: e.start].decode("gbk")
    return text if sum("\u4e00" <= c <= "\u9fff" for c in text) >= GBK_EVIDENCE else None


def gbk_start(data: bytes | memoryview, failed_at: int) -> int:
    """Where GBK text that UTF-8 failed to read at failed_at begins: a GBK character whose two bytes are also a
    two-byte UTF-8 character (说 is CB B5, UTF-8's U+02F5) reads as UTF-8, so the failure comes after it. Steps
    back over such characters (a UTF-8 character of two bytes right before Chinese text in GBK is rare)."""
    at = failed_at
    while at >= 2 and failed_at - at < 32 and 0xC2 <= data[at - 2] <= 0xDF and 0x80 <= data[at - 1] <= 0xBF:
        at -= 2
    return at


def decode_utf8(data: bytes | memoryview, where: str, offset: int = 0, error: Optional[type] = None,
                seen: int = 0) -> str:
    """data as str; invalid UTF-8 raises `error` (UserError by default) naming `where`, the byte offset
    (offset: where data starts in its file) and how to convert the text: GBK and UTF-16 are what Chinese
    Windows and Notepad write. seen: the characters beyond ASCII that earlier pieces of the file held."""
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as e:
        # a piece cut out of a file ends where the cut is, so a lead byte before the cut reads as an
        # "unexpected end of data" even when the file goes on with a byte that cannot continue it
        reason = "starts a character that is not completed" if e.reason == "unexpected end of data" else e.reason
        packed = next((kind for magic, kind in COMPRESSED_MAGIC if magic.match(bytes(data[:16]))), None)
        if offset == 0 and packed:
            how = f"it is compressed ({packed}): decompress it first"
        elif offset == 0 and bytes(data[:4]) == PARQUET_MAGIC:
            how = "it is a Parquet file, not text: write its text column out as a .txt file first"
        elif offset == 0 and bytes(data[:2]) in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16's byte-order mark
            how = ("it is UTF-16 (what Windows Notepad calls 'Unicode'): convert it with "
                   "`iconv -f utf-16 -t utf-8 IN > OUT`")
        elif seen + utf8_evidence(data[: e.start], UTF8_EVIDENCE - seen) >= UTF8_EVIDENCE:
            start = gbk_start(data, e.start)
            reading = gbk_reading(data[start:])
            if reading is not None:  # two files joined, one of them GBK, say: dropping its bytes would wreck it
                at, shown = offset + start, reading[:12].replace("\n", " ")
                how = (f"the text before it is UTF-8, and from byte offset {at} on, read as GBK, it begins "
                       f"{shown!r}. If that is the text, the file changes encoding there (files in two encodings "
                       f"joined, say), and `(head -c {at} IN; tail -c +{at + 1} IN | iconv -f gbk -t utf-8) > OUT` "
                       f"converts the part from there; if not, that part is in another encoding or damaged")
            else:
                how = ("the text before it is UTF-8, so the file has damaged bytes: drop them with "
                       "`iconv -f utf-8 -t utf-8 -c IN > OUT`")
        else:
            how = ("convert the file to UTF-8 first, e.g. `iconv -f gbk -t utf-8 IN > OUT` for Chinese text in "
                   "GBK, `iconv -f latin1 -t utf-8 IN > OUT` for Latin-1 text")
        raise (error or UserError)(f"{where} is not valid UTF-8: byte {data[e.start]:#04x} at byte offset "
                                   f"{offset + e.start} ({reason}); {how}") from None


def read_utf8_file(path: str | os.PathLike, where: str, error: Optional[type] = None) -> str:
    """A UTF-8 text file's text as it is (line ends included), without a byte-order mark, which Windows
    Notepad writes and which is no text; decode_utf8's error where it is not UTF-8. OSError as open raises it.
    A device other than a terminal (/dev/zero, a disk) is refused: it would be read until memory runs out."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if ((stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) and not f.isatty()
                and st.st_rdev != os.stat(os.devnull).st_rdev):  # /dev/null, empty as under cron, is read
            raise (error or UserError)(f"{where} is a device, not a file; pass a file or a pipe")
        data = f.read()
    problem = binary_problem(data)
    if problem:
        raise (error or UserError)(f"{where} is not text: {problem}")
    bom = data.startswith(b"\xef\xbb\xbf")
    return decode_utf8(memoryview(data)[3:] if bom else data, where, 3 if bom else 0, error)


def missing_folders(path: Path) -> list[Path]:
    """The folders that path.mkdir(parents=True) would make, deepest first, resolved: those that do not
    exist, also where the path goes through '..' ('missing/../data' makes 'missing', not the existing 'data')."""
    found = []
    for p in (path.absolute(), *path.absolute().parents):
        if not p.exists() and not p.resolve().exists() and p.resolve() not in found:
            found.append(p.resolve())
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_empty_folders(folders: list[Path]) -> None:
    """rmdir each folder (missing_folders' list, say), deepest first, where it is empty."""
    for folder in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:  # not empty (another run's files, old ones moved aside), or gone already
            pass


def temp_stem(name: str) -> str:
    """name, cut to 200 bytes where it is longer: the temporary file beside it (.NAME.<random>.tmp) must stay within
    the 255 bytes a file name may have, as the name itself does."""
    data = os.fsencode(name)
    return name if len(data) <= 200 else data[:200].decode("utf-8", "ignore")  # not half a character


def remove_unfinished_writes(folder: Path, names: str) -> None:
    """Delete the temporary files that atomic_open and save_checkpoint_as left in folder when a kill cut
    them short (.NAME.<random>.tmp), for the final names that the regular expression `names` matches:
    none is a finished file, and each can be gigabytes."""
    pattern = re.compile(rf"\.(?:{names})\..+\.tmp")
    for p in folder.iterdir() if folder.is_dir() else ():
        if pattern.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def folder_problem(path: Path) -> Optional[str]:
    """Why files cannot be written into `path` as a folder (a file is in the way, no permission to
    write), or None if it is such a folder or can be made one."""
    existing = next(p for p in (path, *path.absolute().parents) if os.path.lexists(p))
    if existing.is_dir():
        if os.access(existing, os.W_OK | os.X_OK):
            return None
        return ("is not writable" if existing == path
                else f"would be made inside {str(existing)!r}, which is not writable")
    what = "a link to nothing" if existing.is_symlink() and not existing.exists() else "a file"
    return f"is {what}" if existing == path else f"is inside {str(existing)!r}, which is {what}"


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[bool]:
    """Hold an exclusive lock on the folder (flock, released when the process ends however it ends, so a
    killed run leaves none behind); yields False if another process holds it. Where flock is missing
    (Windows) or the file system has no locks (some network file systems) it says so and yields True."""
    def unguarded(why: str) -> None:
        print(f"note: {folder} cannot be locked {why}: make sure that no other run writes into it at the same "
              f"time", file=sys.stderr)

    # every yield is outside the except blocks: an error of the caller's would be chained to a handled one
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is None:
        unguarded("on this system (no flock)")
        yield True
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        held = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = False
        except OSError as e:  # ENOLCK, EOPNOTSUPP: nothing can be locked here
            unguarded(f"({e.strerror or e})")
        else:
            # a run that failed removed the folder just before it let go of the lock: this lock is on a
            # folder that is gone (or already made anew by a third run), and guards nothing
            try:
                now = os.stat(folder)
            except FileNotFoundError:
                now = None
            held = now is not None and os.path.samestat(os.fstat(fd), now)
        yield held
    finally:
        os.close(fd)


def lock_holder(folder: Path) -> str:
    """' (pid N)' for another process that holds folder_lock on `folder`, where Linux's /proc/locks names it
    (not where the holder is in another pid namespace, a container, which shows as pid 0); '' otherwise."""
    try:
        st = os.stat(folder)
        table = Path("/proc/locks").read_text()
    except OSError:  # not Linux, or the folder just went away
        return ""
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 4942 fe:00:3186912 0 EOF"; a lock still waited for has "->" after the "1:"
        fields = line.split()
        if fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and len(fields) > 5 and fields[5] == where:
            pid = int(fields[4])
            return f" (pid {pid})" if pid > 0 and pid != os.getpid() else ""
    return ""


def output_file_problem(path: str | os.PathLike) -> Optional[str]:
    """Why `path` cannot be written as a file (a folder there, or its folder unusable), or None."""
    path = Path(path)
    try:
        if path.is_dir():
            return "is a directory"
        if _std_stream(path) is not None:  # written through the stream's descriptor, which needs no access by name
            return None
        if _special_file(path):  # a pipe or a device: written as it is
            return None if os.access(path, os.W_OK) else "cannot be written: permission denied"
        if path.is_file() and not os.access(path, os.W_OK):
            # a file made read-only to keep it: the atomic write, a rename in its folder, would replace it all the same
            return "is write-protected"
        problem = folder_problem(Path(os.path.realpath(path)).parent)  # a link's file is written
    except OSError as e:  # a name too long for the file system, say
        return f"cannot be written: {e.strerror or e}"
    return f"cannot be written: its folder {problem}" if problem else None


OUT_OF_MEMORY = ("out of memory{}; give the run less to hold at once (a smaller batch or model, or text split "
                 "into JSON Lines documents for prepare_data.py)")


def _out_of_memory(e: RuntimeError) -> Optional[str]:
    """For PyTorch failing to allocate (torch.OutOfMemoryError on a GPU, a plain RuntimeError on a CPU): how
    much it tried to allocate, or '' where it does not say; None for any other error."""
    # torch.compile wraps an error in its compiler (it measures kernels, which allocates) in BackendCompilerFailed
    while getattr(e, "inner_exception", None) is not None or e.__cause__ is not None:
        e = getattr(e, "inner_exception", None) or e.__cause__
    text = str(e)
    first = text.splitlines()[0].lower() if text else ""
    if type(e).__name__ != "OutOfMemoryError" and "can't allocate memory" not in first and "out of memory" not in first:
        return None
    asked = re.search(r"tried to allocate (\d+) bytes|tried to allocate ([\d.]+ ?[KMGT]i?B)", text, re.IGNORECASE)
    if asked is None:
        return ""
    if asked[2]:
        return f": tried to allocate {asked[2]}"
    return f": tried to allocate {format_bytes(int(asked[1]))}"


# what torch and Python say of a number past 64 bits where a size or an index is needed
_TOO_LARGE = re.compile(r"Overflow when unpacking long(?: long)?|int too big to convert|"
                        r"cannot fit 'int' into an index-sized integer|Python int too large to convert to C \w+")


def run_cli(main: Callable[[], object], output_on_stdout: bool = False) -> None:
    """Run a script's main(); turn UserError into one line on stderr and exit code 2, and Ctrl-C into
    "interrupted" and exit code 130 (128 + SIGINT, as the shell reports it), without a traceback.
    output_on_stdout: stdout carries the script's product (generate.py's text), so a closed one is an error."""
    def fail(message: str, per_process: bool = False) -> None:
        # under torchrun every process of a machine meets the same error (its flags, its files): the
        # first process of each machine says it, naming its rank where that is not 0; an error of one
        # process's own work is said by that process
        if os.environ.get("LOCAL_RANK", "0") == "0" or per_process:
            rank = os.environ.get("RANK", "0")
            # one write, line end included: processes writing to one stderr at once do not run their lines together
            sys.stderr.write(f"error{'' if rank == '0' else f' (rank {rank})'}: {message}\n")
            sys.stderr.flush()
        else:
            # torchrun ends the other processes as soon as one fails: this one waits, so that the first process of
            # its machine, which meets the same error, has the time to say it before torchrun ends it
            time.sleep(2)
        sys.exit(2)

    # a stream closed by the shell (`2>&-`, `<&-`, `>&-`) is None in Python, and print(file=None) writes to
    # stdout: messages would mix into the output. Nothing is read or shown there, as with /dev/null
    if sys.stdout is None and output_on_stdout:  # the product itself would be lost
        sys.stderr = sys.stderr or open(os.devnull, "w")
        fail("the standard output is closed (>&-); send it to a file, or to /dev/null to discard it")
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode))
    # a redirected stdout on Chinese Windows writes GBK: a character it lacks (the ñ of a file name, an emoji)
    # is shown escaped instead of ending the script with a traceback after its work is done
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    import signal
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:  # from here Ctrl-C raises KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except UserError as e:
        fail(str(e), e.per_process)
    except PermissionError as e:
        # a file or folder this user may not read or write (another user's, a mode 000 folder on the path):
        # the scripts check their outputs up front, while a read anywhere can meet one; root never does
        names = " and ".join(repr(str(f)) for f in (e.filename, e.filename2) if f is not None)
        fail(f"{e.strerror or e}: {names or 'a file'}; check the permissions of that file and of the folders "
             f"above it")
    except MemoryError:
        fail(OUT_OF_MEMORY.format(""), per_process=True)
    except (TypeError, OverflowError) as e:
        # a size past 64 bits (--block_size=99999999999999999999) reaches torch or Python's indexing as these
        too_large = _TOO_LARGE.search(str(e))
        if too_large is None:
            raise
        fail(f"a size or count given is too large to work with ({too_large.group(0)}); give smaller values")
    except RuntimeError as e:  # PyTorch's allocators raise these (torch.OutOfMemoryError is one), not MemoryError
        asked = _out_of_memory(e)
        if asked is None:
            raise
        fail(OUT_OF_MEMORY.format(asked), per_process=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # `python generate.py ... | head` closes stdout early; that is not an error
        sys.stderr.close()
        sys.exit(0)
    except OSError as e:
        # a path the system refuses (a name over 255 bytes, a file where a folder should be, a loop of links),
        # or a full disk under the output (`> out.txt`): the user's to fix, as the errors above
        if e.filename is None and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        names = " and ".join(repr(str(f)) for f in (e.filename, e.filename2) if f is not None)
        fail(f"{e.strerror or e}: {names}; check that path" if names else
             f"{e.strerror or e} while writing the output; free some space there")


def silence(stream) -> None:
    """Point a closed or failing stream's file descriptor at os.devnull: what it still buffers, and every
    later write, go nowhere instead of raising again (at exit, say)."""
    with contextlib.suppress(OSError, ValueError):
        fd = stream.fileno()  # first: a stream without one (io.StringIO) has nothing to point elsewhere
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


def print_result(line: str, stream: Optional[IO] = None) -> None:
    """A script's last line, said once its product is complete on disk (prepare_data.py's data set, tokenizer.py's
    file). A stdout that cannot take it (`> log.txt` on a full disk, /dev/full) does not make the finished work a
    failure with exit code 2: the line goes to stderr instead, and the script ends as it would have."""
    stream = stream or sys.stdout
    try:
        print(line, file=stream, flush=True)
    except OSError as e:
        silence(stream)  # the line it still buffers would fail again at exit
        if stream is not sys.stderr:
            with contextlib.suppress(OSError):
                print(f"{line} (stdout could not take this line: {e.strerror or e})", file=sys.stderr, flush=True)


def _std_stream(path: Path) -> Optional[IO]:
    """sys.stdout or sys.stderr if path is where that stream goes (/dev/stdout, or the file it is redirected to)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if os.path.samestat(os.stat(path), os.fstat(stream.fileno())):
                return stream
        except (OSError, ValueError, AttributeError):  # no such path; a stream without a descriptor
            pass
    return None


def _special_file(path: Path) -> bool:
    """A pipe, a terminal or a device: something that exists and is neither a file nor a folder."""
    return path.exists() and not path.is_file() and not path.is_dir()


def writes_directly(path: Path) -> bool:
    """Whether atomic_open writes into path as it is, rather than replacing it: a pipe, a terminal or a
    device, and where this process's stdout or stderr goes."""
    return _special_file(path) or _std_stream(path) is not None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success flush, fsync and rename it over `path`.

    A crash or an exception inside the block leaves `path` as it was (or absent) and
    removes the temporary file, so a half-written file never looks complete.

    A link is followed: the file it points to is replaced and the link stays. A pipe, a terminal or a
    device (/dev/null, /dev/stdout) is written directly, since renaming over it would put a plain
    file in its place.
    """
    path = Path(path)
    encoding = None if "b" in mode else "utf-8"
    std = _std_stream(path)
    if std is not None:  # after what the script printed: through the same descriptor, which keeps its offset
        std.flush()
        with open(os.dup(std.fileno()), mode.replace("w", "a"), encoding=encoding) as f:
            yield f
        return
    if _special_file(path):
        with open(path, mode, encoding=encoding) as f:
            yield f
        return
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{temp_stem(path.name)}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the permissions open() would have given it: those of
        # the file it replaces (a checkpoint made private with chmod 600 stays private), else 0666 less the umask
        try:
            permissions = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            permissions = 0o666 & ~_UMASK
        os.chmod(tmp, permissions)
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _rename_over(tmp, path)


def _rename_over(tmp: str | os.PathLike, path: Path) -> None:
    """os.replace(tmp, path), removing tmp if that fails; then make the rename durable."""
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable: fsync its entry where the OS allows it."""
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# ---------------------------------------------------------------------------- device and dtype

class DeviceError(UserError, ValueError):
    """A device that does not exist or is not available here, or an unknown dtype name."""


def synchronize(device: "torch.device") -> None:
    """Wait for the work queued on a GPU (CUDA or Apple's MPS), so that a timer reads the time it took."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name_problem(name) -> Optional[str]:
    """Why `name` is no --device value, or None. train.py and generate.py take the same names: torch.device
    would also take 'cpu:0', 'meta' or 'cuda:1234567890' (which it wraps to cuda:-46), and train.py's config
    file would not."""
    # ASCII digits without a leading zero, at most nine: torch.device refuses 'cuda:01', 'cuda:١' and 20 digits
    if isinstance(name, str) and re.fullmatch(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]{0,8}))?", name):
        return None
    return f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}"


def resolve_device(name: str = "auto") -> "torch.device":
    """'auto' -> cuda if available, then mps, then cpu; otherwise the named device, which must exist here.

    'cuda' keeps no index (the current GPU); 'cuda:1' on a machine with one GPU is a DeviceError.
    """
    import torch
    if isinstance(name, torch.device):  # batch_generate(..., device=next(model.parameters()).device), say
        # torch names its own devices 'cpu:0' or 'mps:0', which the flag refuses: only a GPU's index matters
        name = name.type if name.type != "cuda" or name.index is None else f"cuda:{name.index}"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    problem = device_name_problem(name)
    if problem:
        raise DeviceError(problem)
    device = torch.device(name.partition(":")[0])
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device={name} was asked for, but this PyTorch sees no CUDA GPU; "
                              "use --device=cpu (or --device=auto)")
        # the index is checked before torch.device sees it, which keeps only its low 8 bits: 'cuda:128' would
        # be cuda:-128, and 'cuda:255' the current GPU
        index = int(name.partition(":")[2]) if ":" in name else None
        if index is not None and index >= torch.cuda.device_count():
            raise DeviceError(f"--device={name} was asked for, but this machine has {torch.cuda.device_count()} "
                              f"CUDA GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}; use one of them, "
                              "or --device=cuda")
        device = torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device={name} was asked for, but MPS is not available here; use --device=cpu")
    return device


def resolve_dtype(name, device: "torch.device") -> "torch.dtype":
    """'auto' -> bfloat16 on CUDA GPUs from Ampere on (compute capability 8.0), float16 on older ones,
    float32 elsewhere.

    name: 'auto', 'float32', 'bfloat16', 'float16', or a torch.dtype (returned as it is).
    """
    import torch
    from config import DTYPES
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device.type == "cuda":
            # not torch.cuda.is_bf16_supported(): it also says yes where bf16 is only emulated (V100, T4),
            # which runs without tensor cores and flash attention, several times slower than float16
            return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise DeviceError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_warning(device: "torch.device", dtype: "torch.dtype") -> Optional[str]:
    """A warning for a dtype this device runs far slower than float32, else None: float16 on a CPU, which most
    processors have no arithmetic for, so torch emulates it (a matrix product up to 40x slower than float32 on a
    2-core AVX-512 EPYC, training 12x on one thread and 17-19x on two: BENCHMARKS.md). bfloat16 is native on CPUs
    with AVX512-BF16 or AMX."""
    import torch
    if device.type == "cpu" and dtype == torch.float16:
        return ("warning: float16 on a CPU is emulated by most processors and runs many times slower than float32 "
                "(12-19x in training on a 2-core EPYC); use --dtype=float32, or bfloat16 where the CPU has it")
    return None


def bytecode_note() -> Optional[str]:
    """A note when this Python writes no byte code (PYTHONDONTWRITEBYTECODE, -B) and torch has none: each start then
    compiles torch's modules from source again, about 2,700 of them once torch.compile's parts are imported. Some
    container images set the variable and install their packages without byte code; on such a GPU machine a
    shakespeare-char run took 15-21 s longer (BENCHMARKS.md). torch's own __init__ stands for the rest; a torch
    shipped as byte code alone (its __init__ a .pyc) needs none."""
    if not sys.dont_write_bytecode:
        return None
    import importlib.util
    import torch
    init = Path(torch.__file__)
    if init.suffix != ".py":
        return None
    try:
        if Path(importlib.util.cache_from_source(str(init))).exists():  # where PYTHONPYCACHEPREFIX puts it, if set
            return None
    except NotImplementedError:  # an interpreter without byte code at all
        return None
    return (f"note: Python writes no byte code here (PYTHONDONTWRITEBYTECODE or -B) and finds none for torch, so "
            f"each start compiles torch's modules from source again (15-21 s a run on the GPU machines measured); "
            f"unset PYTHONDONTWRITEBYTECODE, or write the byte code once: {shlex.quote(sys.executable)} -m compileall "
            f"-qq -j 0 {shlex.quote(str(init.parents[1]))}")


def machine_memory(meminfo: str = "/proc/meminfo") -> Optional[int]:
    """Bytes of memory this machine can give a process at most, RAM and swap, or None where unknown: for
    refusing a size that cannot fit before the kernel kills the process for it (Linux) or it fills the swap."""
    try:
        with open(meminfo, encoding="ascii") as f:  # Linux: "MemTotal:  24684092 kB", swap likewise
            kb = dict((name, int(value.split()[0])) for name, _, value in (line.partition(":") for line in f)
                      if name in ("MemTotal", "SwapTotal"))
        return (kb["MemTotal"] + kb.get("SwapTotal", 0)) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:  # macOS and other Unixes: RAM alone
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # Windows
        return None


BYTE_UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1))


def byte_unit(n: float) -> str:
    """The largest unit of BYTE_UNITS that n reaches ('B' below a kilobyte)."""
    return next((name for name, size in BYTE_UNITS if n >= size), "B")


def format_bytes(n: float, decimals: int = 0, unit: Optional[str] = None) -> str:
    """1234567 -> '1 MB': in units of 10^3, as disks and the figures here count (byte_unit's, or the one
    given); gigabytes with one decimal more than the others."""
    unit = unit or byte_unit(n)
    return f"{n / dict(BYTE_UNITS)[unit]:,.{decimals + (unit == 'GB')}f} {unit}"


def format_bytes_apart(needed: float, available: float) -> tuple[str, str]:
    """format_bytes of both in the larger one's unit, with as many more decimals as it takes for two amounts that
    differ not to read the same: 'needs at least 2 MB ... has 2 MB' says nothing, and neither does '1.0 GB ...
    1,000 MB'. Nine decimals tell bytes apart in gigabytes."""
    unit = byte_unit(max(needed, available))
    for decimals in range(10):
        pair = format_bytes(needed, decimals, unit), format_bytes(available, decimals, unit)
        if pair[0] != pair[1] or needed == available:
            break
    return pair


# ---------------------------------------------------------------------------- checkpoints
# A checkpoint is a plain dict, loadable with torch.load(..., weights_only=True):
#   model       state_dict of the raw module (never compiled or DDP-wrapped: no '_orig_mod.' prefixes)
#   optimizer   optimizer.state_dict()            scaler     GradScaler state_dict() or None
#   iter_num    optimizer steps completed         best_val_loss  float
#   config      GPT2Config.to_dict()              meta       the data set's meta.json
#   tokenizer   tokenizer.to_dict()               version    CHECKPOINT_VERSION
#   run_dir     the TensorBoard run directory
#   checkpoint_folder  the absolute folder that wrote it: a copy of the folder resumes into a run of its own
#   rng         a list, by rank: each process's python/numpy/torch/cuda(/mps) RNG states
#   progress    {"loss_sums": each process's train-loss sum since the last log step, "steps": steps in
#               it, "eval_s": seconds the last evaluation took, "eval_owed": whether a signal cut short
#               the evaluation at iter_num, "evaluated_at": the iteration of the last whole evaluation}:
#               a resumed run logs, estimates and evaluates as before
#   started_from  'scratch', a GPT-2 name or a Hugging Face folder's absolute path: what the run's first
#               weights were, so that repeating a fine-tuning command continues its run
#   started_from_fingerprint  for a folder, "slices64:" and a digest of its config and weight files (None
#               otherwise): another model exported into the same folder since is another start
# Everything in it is tensors, numbers, strings, lists, tuples and dicts, so no code runs on load.

CHECKPOINT_VERSION = 1
# the order generate.py tries them in when no file is named
CHECKPOINT_FALLBACK = ("best_checkpoint.pt", "checkpoint.pt", "final_checkpoint.pt")
ITER_CHECKPOINT = re.compile(r"checkpoint_iter_(\d+)\.pt")  # save_interval's kept steps


def iter_checkpoints(folder: Path) -> list[Path]:
    """The checkpoint_iter_N.pt files in folder, oldest step first (by N, not by name: 5 before 20)."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := ITER_CHECKPOINT.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or unsafe to load."""


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """torch.save through a temporary file, fsync and rename: a crash mid-save keeps the old file."""
    import torch
    with atomic_open(path, "wb") as f:
        torch.save(checkpoint, f)


def save_checkpoint_as(path: str | os.PathLike, saved: str | os.PathLike, checkpoint: dict) -> None:
    """Give `path` the contents of `saved`, the file save_checkpoint just wrote from `checkpoint`.

    A hard link under a temporary name, renamed over `path`, costs nothing where writing a large
    checkpoint again would take seconds; `path` is replaced whole or not at all. Later saves replace
    `saved` by renaming a new file over it, so the two names never share a change. Where the file
    system has no hard links, `checkpoint` is written again. A link at `path` is followed, as
    atomic_open follows it: the file it points to is replaced and the link stays.
    """
    path = Path(os.path.realpath(path))
    try:  # a link shares `saved`'s permissions: a file made private (chmod 600) is written again, and stays so
        other_permissions = stat.S_IMODE(os.stat(path).st_mode) != stat.S_IMODE(os.stat(saved).st_mode)
    except OSError:  # no file at `path` yet
        other_permissions = False
    if other_permissions:
        save_checkpoint(path, checkpoint)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link.tmp")
    try:
        os.link(saved, tmp)
    except OSError:
        save_checkpoint(path, checkpoint)
        return
    _rename_over(tmp, path)


# what the weights-only unpickler says when it meets a class or function it does not allow; anything
# else it says (an unknown opcode in random bytes, say) means the file is damaged, not unsafe
_REFUSED_GLOBAL = re.compile(r"unsupported global|unsupported class|not an allowed global|unrecognized function|"
                             r"can only (?:build|create new object)", re.IGNORECASE)


def load_weights_only(path: str | os.PathLike, what: str = "checkpoint", map_location="cpu"):
    """torch.load with weights_only=True. A file that needs arbitrary pickled objects is refused:
    unpickling an untrusted file can run code. A file torch.load cannot read for any other reason
    (empty, truncated, not a PyTorch file at all) is a CheckpointError saying so; `what` names the file."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} " + ("is a directory" if path.is_dir() else "is not a regular file (a "
                              "device or a pipe)" if path.exists() else "does not exist"))
    try:
        with warnings.catch_warnings():
            # a damaged file can look like an unusual pickle protocol; the error below says it better
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load fails in many types (EOFError, KeyError, RuntimeError, ...)
        text = str(e)
        refused = _REFUSED_GLOBAL.search(text)
        if refused:
            line = text[text.rfind("\n", 0, refused.start()) + 1:].split("\n")[0]
            # 'Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default'
            line = line.split("WeightsUnpickler error:")[-1].strip().split(". ")[0]
            raise CheckpointError(f"refusing to load {path}: it holds pickled objects other than tensors and "
                                  f"plain data ({line[:200]}); loading them could run arbitrary code. Only "
                                  "load such a file if you trust its source, and convert it to a plain "
                                  "state_dict first") from None
        # the unpickler's own complaint, not torch.load's generic advice around it
        m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        first = m.group(1) if m else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        first = first.split(". ")[0]  # the first sentence: torch's follow-up advice does not fit one line
        reason = ("the file is empty" if path.stat().st_size == 0
                  else f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__)
        # an OSError naming the file is the system's (permission denied); torch's reader of a truncated file raises
        # OSError too ("[Errno 22] Invalid argument"), without a name
        hint = "" if isinstance(e, OSError) and e.filename is not None else " (truncated or not a PyTorch file?)"
        raise CheckpointError(f"cannot read {what} {path}: {reason}{hint}") from None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint of train.py, read by load_weights_only: a dict with at least 'model' and 'config'."""
    ckpt = load_weights_only(path, "checkpoint", map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project: expected a dict with "
                              "'model' and 'config' (a Hugging Face GPT-2 directory loads with --init_from)")
    return ckpt


def find_checkpoint(checkpoint_dir: str | os.PathLike) -> Path:
    """The first of best_checkpoint.pt, checkpoint.pt, final_checkpoint.pt that exists in checkpoint_dir."""
    d = Path(checkpoint_dir)
    if d.is_file():
        raise CheckpointError(f"--checkpoint_dir {d} is a file, not a folder; to read that file as a checkpoint, "
                              f"pass --checkpoint {shlex.quote(str(d))}")
    for name in CHECKPOINT_FALLBACK:
        if (d / name).is_file():
            return d / name
    searched = ", ".join(str(d / n) for n in CHECKPOINT_FALLBACK)
    # what the folder holds instead says more than how to train: a kept step, or a Hugging Face export
    steps = [p for p in iter_checkpoints(d) if p.is_file()] if d.is_dir() else []
    if steps:
        raise CheckpointError(f"no checkpoint found (searched {searched}), but {d} holds {len(steps)} kept step(s); "
                              f"read the newest with --checkpoint {shlex.quote(str(steps[-1]))}")
    if (d / "config.json").is_file():
        raise CheckpointError(f"{d} holds no checkpoint of train.py (searched {searched}) but a Hugging Face model "
                              f"folder; read it with --init_from {shlex.quote(str(d))}")
    # the README's runs each have a folder of their own (checkpoints/char): a command that leaves out
    # --checkpoint_dir, or misspells it, has a trained model nearby, which says more than how to train one
    trained = folders_holding(d, CHECKPOINT_FALLBACK) if d.is_dir() else []
    if trained:
        shown = ", ".join(str(p) for p in trained[:5]) + (", ..." if len(trained) > 5 else "")
        raise CheckpointError(f"no checkpoint found in {d} itself (searched {searched}), but folders in it hold "
                              f"trained models: {shown}; pass one, e.g. --checkpoint_dir "
                              f"{shlex.quote(str(trained[0]))}")
    siblings = folders_holding(d.parent, CHECKPOINT_FALLBACK) if not d.exists() and d.parent.is_dir() else []
    meant = near_miss(d.name, [p.name for p in siblings])
    if meant:
        raise CheckpointError(f"{d} does not exist; did you mean --checkpoint_dir "
                              f"{shlex.quote(str(d.parent / meant))}, which holds a trained model?")
    # train.py writes into ./checkpoints unless told otherwise: the command must name this folder
    into = "" if d.absolute() == Path("checkpoints").absolute() else f" --checkpoint_dir={shlex.quote(str(d))}"
    raise CheckpointError(f"no checkpoint found (searched {searched}); train one first, e.g. "
                          "`python prepare_data.py --dataset shakespeare --tokenizer char && "
                          f"python train.py --preset=shakespeare-char-cpu{into}`, or pass --checkpoint PATH "
                          "or --init_from gpt2")


def folders_holding(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """The folders right under folder that hold a file of one of names (a trained run, a prepared data set),
    sorted; none where folder cannot be read."""
    try:
        subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return []
    # os.path.isfile is False for a folder this user may not enter (lost+found), where Path.is_file raises
    return [p for p in subfolders if any(os.path.isfile(p / name) for name in names)]


def near_miss(name: str, candidates: list[str]) -> Optional[str]:
    """The candidate that name, mistyped, most likely meant; None where none is near."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def model_from_checkpoint(ckpt: dict, source: str | os.PathLike = "the checkpoint"):
    """Rebuild the GPT a checkpoint describes and load its weights (on the CPU, in float32)."""
    from config import GPT2Config
    from model import GPT
    model = GPT(GPT2Config.from_dict(ckpt["config"]))
    load_weights(model, ckpt["model"], source)
    return model


def load_weights(model, state_dict, source: str | os.PathLike) -> None:
    """model.load_state_dict(state_dict), or one CheckpointError line saying how they differ."""
    own = model.state_dict()
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source}: its 'model' entry is a {type(state_dict).__name__}, not a state_dict")
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [k for k in own if k in state_dict and getattr(state_dict[k], "shape", None) != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        got = tuple(state_dict[k].shape) if hasattr(state_dict[k], "shape") else type(state_dict[k]).__name__
        problems.append(f"{len(reshaped)} of another shape (e.g. {k}: {got}, expected {tuple(own[k].shape)})")
    if problems:
        hint = ""
        for prefix in ("_orig_mod.", "module."):  # saved from torch.compile's or DDP's wrapper
            if unexpected and all(k.startswith(prefix) for k in unexpected):
                hint = f"; the names carry the prefix {prefix!r} of a wrapped model: save the unwrapped module's"
        raise CheckpointError(f"{source}: its weights do not fit the model its config describes: "
                              f"{', '.join(problems)}{hint}")
    model.load_state_dict(state_dict)


# ---------------------------------------------------------------------------- RNG state
# Saved in every checkpoint so a resumed run continues the same random streams (dropout, sampling)
# and training 20 + 20 iterations gives the same weights as 40 straight. Stored as tensors and plain
# numbers only, so the checkpoint stays loadable with weights_only=True.

def get_rng_state(device=None) -> dict:
    """The python, numpy, torch CPU and (for a CUDA or MPS `device`) that device's generator states."""
    import random
    import numpy as np
    import torch
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device is not None and torch.device(device).type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict, device=None) -> None:
    """Restore what get_rng_state() captured (the CUDA part only when `device` is a CUDA device)."""
    import random
    import numpy as np
    import torch
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if state.get("mps") is not None and device is not None and torch.device(device).type == "mps":
        torch.mps.set_rng_state(state["mps"])


def format_duration(seconds: float) -> str:
    """A short human duration: 42s, 3m05s, 2h07m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress(tqdm):
    """tqdm's bar on a terminal; elsewhere (a log file, nohup, CI) a plain line every LINE_INTERVAL
    seconds, the first one after LINE_INTERVAL seconds, so that short runs print nothing extra."""
    LINE_INTERVAL = 30.0
    # no monitor thread: prepare_data.py forks its worker pool after the bar exists, and forking a
    # process that runs threads is unsafe (Python 3.12 warns about it)
    monitor_interval = 0

    def __init__(self, *args, file=None, **kwargs):
        file = sys.stderr if file is None else file
        self.lines = not (hasattr(file, "isatty") and file.isatty())
        self.drawn = False  # a bar on the terminal: whether it has been drawn yet
        if self.lines:  # what the program prints next says how it ended: no last bar line
            kwargs.update(mininterval=self.LINE_INTERVAL, delay=self.LINE_INTERVAL, leave=False)
        super().__init__(*args, file=file, disable=False, **kwargs)

    def display(self, msg=None, pos=None):
        if not self.lines:
            self.drawn = True
            return super().display(msg, pos)
        if msg == "":  # tqdm clearing the bar as it closes: a line has nothing to clear
            return False
        print(msg if msg is not None else self.__str__(), file=self.fp, flush=True)  # no '\r' redrawing
        return True

    def print_above(self, text: str, file: IO[str]) -> None:
        """Write text to file (stdout, say) without tearing a bar drawn on the terminal: it is taken away
        and drawn again below. Lines need no such care, and a bar not drawn yet is not drawn early."""
        drawn = self.drawn
        if drawn:
            self.clear()
        file.write(text)
        file.flush()
        if drawn:
            self.refresh()
