// Drives a roomfs mount with flydrive's local-disk driver the way @nhtio/adk's FlydriveSpoolStore
// does (its write → put / putStream(Readable.fromWeb(...)), read → exists, its reader →
// getMetaData / get / getStream, delete → exists + delete), plus listAll, under the mount's
// grant and the session's limits. Exits non-zero on the first wrong answer; prints the memory
// figures as one JSON line, then "flydrive spool: ok".
//
//   node flydrive_spool.mjs MOUNT DAEMON_PID
//
// The mount is a session with `--max-file-size 100Mi --max-bytes 150Mi`, granted `spool/:rw`
// and `inputs/:ro`; `inputs/brief.txt` and `private/secret.txt` exist.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { writeFile } from 'node:fs/promises';
import { Readable } from 'node:stream';
import { Disk } from 'flydrive';
import { FSDriver } from 'flydrive/drivers/fs';

const [mount, daemonPid] = process.argv.slice(2);
const MiB = 1024 * 1024;
const disk = new Disk(new FSDriver({ location: mount, visibility: 'private' }));

// put, exists, get, getMetaData, getBytes: a spool store's small, eager artifacts.
const text = 'line one\nline two\n';
await disk.put('spool/call-1.txt', text);
assert.equal(await disk.exists('spool/call-1.txt'), true);
assert.equal(await disk.get('spool/call-1.txt'), text);
assert.equal((await disk.getMetaData('spool/call-1.txt')).contentLength, Buffer.byteLength(text));
await disk.put('spool/call-2.bin', new Uint8Array([0, 1, 2, 255]));
assert.deepEqual([...(await disk.getBytes('spool/call-2.bin'))], [0, 1, 2, 255]);
assert.equal(await disk.exists('spool/nothing.txt'), false);
assert.equal(await disk.get('inputs/brief.txt'), 'summarise this\n');

// listAll, flat and recursive; the root lists only what the grant leads to (no private/, and
// no .meta/, which the grant does not cover).
const keys = async (prefix, options) =>
  [...(await disk.listAll(prefix, options)).objects]
    .map((o) => (o.isFile ? o.key : `${o.prefix}/`))
    .sort();
assert.deepEqual(await keys('/'), ['inputs/', 'spool/']);
assert.deepEqual(await keys('spool', { recursive: true }), ['spool/call-1.txt', 'spool/call-2.bin']);

// delete: the file goes; deleting what is not there resolves (flydrive ignores ENOENT).
await disk.delete('spool/call-2.bin');
assert.equal(await disk.exists('spool/call-2.bin'), false);
await disk.delete('spool/call-2.bin');

// Outside the grant, or under its read-only prefix: a rejected promise whose cause is EACCES.
// A cause's errno is checked by number: Node has no name for EDQUOT (its `code` is "Unknown
// system error -122").
const refused = (code, errno) => (e) => {
  assert.equal(e.code, code, e.stack);
  assert.equal(e.cause?.errno, -constants.errno[errno], e.cause?.stack ?? e.stack);
  return true;
};
await assert.rejects(disk.put('private/new.txt', 'x'), refused('E_CANNOT_WRITE_FILE', 'EACCES'));
await assert.rejects(disk.put('notes.txt', 'x'), refused('E_CANNOT_WRITE_FILE', 'EACCES'));
await assert.rejects(disk.put('inputs/new.txt', 'x'), refused('E_CANNOT_WRITE_FILE', 'EACCES'));
await assert.rejects(disk.delete('inputs/brief.txt'), refused('E_CANNOT_DELETE_FILE', 'EACCES'));
await assert.rejects(disk.exists('private/secret.txt'),
  refused('E_CANNOT_CHECK_FILE_EXISTENCE', 'EACCES'));
await assert.rejects(disk.get('private/secret.txt'), refused('E_CANNOT_READ_FILE', 'EACCES'));
// The message a user reads names the key; the errno is the cause's.
const outside = await disk.put('private/new.txt', 'x').catch((e) => e);
assert.match(outside.message, /Cannot write file at location "private\/new.txt"/);
assert.match(outside.cause.message, /^EACCES: permission denied/);

// Memory: a process's RSS now (VmRSS) or its peak so far (VmHWM), in bytes, from /proc.
const status = (pid, field) => {
  const m = readFileSync(`/proc/${pid}/status`, 'utf8').match(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm'));
  return Number(m[1]) * 1024;
};
// A web stream of `bytes` that makes each 256 KiB chunk when asked (so nothing but the stream
// itself holds data), hashing what it gives out: what FlydriveSpoolStore.write hands putStream
// for a ReadableStream, through Readable.fromWeb.
const CHUNK = 256 * 1024;
function source(bytes, hash) {
  let sent = 0;
  return Readable.fromWeb(new ReadableStream({
    pull(controller) {
      if (sent >= bytes) return controller.close();
      const n = Math.min(CHUNK, bytes - sent);
      const chunk = Buffer.alloc(n, `chunk ${sent / CHUNK} of a spooled tool output\n`);
      hash?.update(chunk);
      sent += n;
      controller.enqueue(new Uint8Array(chunk.buffer, chunk.byteOffset, n));
    },
  }, { highWaterMark: 1 }));
}
// Growth of both processes while `work` runs: peak RSS during it minus RSS before. The peak is
// the high-water mark of the whole process life, so this can only overstate the growth.
async function growth(work) {
  globalThis.gc?.();
  const before = { node: process.memoryUsage().rss, daemon: status(daemonPid, 'VmRSS') };
  const result = await work();
  return {
    result,
    node: process.resourceUsage().maxRSS * 1024 - before.node,
    daemon: status(daemonPid, 'VmHWM') - before.daemon,
  };
}

// putStream of 100 MiB (exactly the session's largest file), then read back by getStream.
const BIG = 100 * MiB;
const written = createHash('sha256');
const put = await growth(() => disk.putStream('spool/big.bin', source(BIG, written)));
assert.equal((await disk.getMetaData('spool/big.bin')).contentLength, BIG);
const read = await growth(async () => {
  const h = createHash('sha256');
  let n = 0;
  for await (const chunk of await disk.getStream('spool/big.bin')) {
    h.update(chunk);
    n += chunk.length;
  }
  return { n, digest: h.digest('hex') };
});
assert.equal(read.result.n, BIG);
assert.equal(read.result.digest, written.digest('hex'));

const round = (b) => Math.round((b / MiB) * 10) / 10;
console.log(JSON.stringify({
  put_stream_mib: { node: round(put.node), daemon: round(put.daemon) },
  get_stream_mib: { node: round(read.node), daemon: round(read.daemon) },
}));
// A buffered put or get would grow one of them by the whole 100 MiB. Node itself grows by some
// 30-40 MiB while streaming (chunks wait for its garbage collector; the same on a plain
// directory); the daemon by less than 1 MiB.
for (const [what, g] of [['putStream', put], ['getStream', read]]) {
  assert.ok(g.node < 64 * MiB, `${what} grew node by ${round(g.node)} MiB`);
  assert.ok(g.daemon < 32 * MiB, `${what} grew the daemon by ${round(g.daemon)} MiB`);
}

// The session's limits. `put` (a string or bytes: what FlydriveSpoolStore.write does with
// them) rejects with the mount's errno as the cause. flydrive's `putStream` rejects too, but
// loses the errno: when the write fails, Node destroys the source stream, and FSDriver's
// putStream settles on that stream's AbortError first (flydrive 2.1.0, Node 20 and 24 alike;
// /dev/full shows it without roomfs). Node's own writeFile of the same kind of stream gets
// the errno, so the mount gives it.
const USED = 18 + 15 + 15; // call-1.txt, inputs/brief.txt, private/secret.txt
const path = (key) => `${mount}/${key}`;
async function pastLimit(key, bytes, errno, text) {
  const buffered = await disk.put(key, Buffer.alloc(bytes, 'x')).catch((e) => e);
  assert.ok(buffered instanceof Error, `a put of ${bytes} bytes to ${key} rejects`);
  refused('E_CANNOT_WRITE_FILE', errno)(buffered);
  assert.match(buffered.cause.message, text);
  const kept = (await disk.getMetaData(key)).contentLength;
  // (If a later flydrive keeps the errno, expect `refused('E_CANNOT_WRITE_FILE', errno)` here.)
  await assert.rejects(disk.putStream(key, source(bytes)),
    (e) => e.code === 'E_CANNOT_WRITE_FILE' && e.cause?.code === 'ABORT_ERR');
  await assert.rejects(writeFile(path(key), source(bytes)),
    (e) => e.errno === -constants.errno[errno]);
  return kept;
}
// Bytes (150 MiB): with big.bin's 100 MiB there, 60 MiB more is refused with EDQUOT once the
// space is full; the file keeps what was written before, within the limit.
const overKept = await pastLimit('spool/over.bin', 60 * MiB, 'EDQUOT', /^Unknown system error -122/);
assert.ok(overKept > 0 && BIG + overKept + USED <= 150 * MiB, `over.bin kept ${overKept} bytes`);
await disk.delete('spool/over.bin');
await disk.delete('spool/big.bin');
// Largest file (100 MiB): 1 MiB more is refused with EFBIG; the file keeps the first 100 MiB.
const hugeKept = await pastLimit('spool/huge.bin', BIG + MiB, 'EFBIG', /^EFBIG: file too large/);
assert.equal(hugeKept, BIG);
await disk.delete('spool/huge.bin');
console.log('flydrive spool: ok');
