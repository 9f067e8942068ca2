// Plays the experimental-agent SDK's storage calls against a roomfs daemon through the example
// adapter. Exits non-zero on the first wrong answer. Usage: node sdk_storage.mjs SOCKET SESSION
import assert from 'node:assert/strict';
import { roomfsStorage } from '../../examples/roomfs-storage.mjs';

const [socketPath, sessionId] = process.argv.slice(2);
const storage = roomfsStorage({ socketPath });
const now = 1763700000000;

// A session is created, read back and updated (update returns the merged record).
const session = { id: sessionId, createdAt: now, updatedAt: now, model: 'anthropic/claude-sonnet-4-6',
  system: 'Be brief.', activeTools: ['bash'], 'x-extra': { kept: [1, 2.5, null] } };
assert.equal(await storage({ method: 'session.get', id: sessionId }), null);
await storage({ method: 'session.set', id: sessionId, value: session });
assert.deepEqual(await storage({ method: 'session.get', id: sessionId }), session);
const merged = await storage({ method: 'session.update', id: sessionId,
  updates: { updatedAt: now + 5, lastMessageId: 'm2' } });
assert.deepEqual(merged, { ...session, updatedAt: now + 5, lastMessageId: 'm2' });

// Messages and parts, written the way a turn is recorded (parts out of order on purpose).
await storage({ store: { event: { method: 'message.set', id: 'm1',
  value: { id: 'm1', sessionId, role: 'user', createdAt: now + 1 } } } });
await storage({ event: { method: 'message.set', id: 'm2',
  value: { id: 'm2', sessionId, role: 'assistant', createdAt: now + 2, metadata: { note: 'ünïcødé' } } } });
await storage({ method: 'part.set', id: 'p2', value: { id: 'p2', sessionId, messageId: 'm2', index: 1, type: 'text', text: 'second' } });
await storage({ method: 'part.set', id: 'p1', value: { id: 'p1', sessionId, messageId: 'm2', index: 0, type: 'text', text: 'first' } });
await storage({ method: 'part.set', id: 'p0', value: { id: 'p0', sessionId, messageId: 'm1', index: 0, type: 'text', text: 'hello' } });
const messages = await storage({ method: 'message.listBySession', sessionId });
assert.deepEqual(messages.map((m) => m.id), ['m1', 'm2']);
assert.equal(messages[1].metadata.note, 'ünïcødé');
const parts = await storage({ method: 'part.listBySession', sessionId });
assert.deepEqual(parts.map((p) => p.id), ['p0', 'p1', 'p2']);
const usage = await storage({ method: 'message.update', id: 'm2', updates: { usage: { inputTokens: 3 } } });
assert.deepEqual(usage.usage, { inputTokens: 3 });

// Sandbox and setup records.
await storage({ method: 'sandbox.set', id: 'sb1', value: { id: 'sb1', createdAt: now, updatedAt: now, binding: 'local' } });
assert.equal((await storage({ method: 'sandbox.update', id: 'sb1', updates: { updatedAt: now + 9 } })).updatedAt, now + 9);
await storage({ method: 'setup.set', id: 'st1', value: { id: 'st1', version: 2, snapshotId: null } });
assert.deepEqual(await storage({ method: 'setup.get', id: 'st1' }), { id: 'st1', version: 2, snapshotId: null });

// Errors come back as exceptions with the daemon's status.
await assert.rejects(storage({ method: 'session.update', id: 'nope', updates: {} }), (e) => e.status === 404);
await assert.rejects(storage({ method: 'session.explode', id: 'x' }), (e) => e.status === 400);
console.log('sdk storage: ok');
