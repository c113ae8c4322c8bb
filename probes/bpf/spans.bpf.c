// SPDX-License-Identifier: GPL-2.0
/* LatencyPrism's eBPF probe program: pairs entries and returns in the kernel.
 *
 * One program for every site, attached with BPF uprobe_multi links filtered to the
 * target's pid (kernel >= 6.6). The link's per-offset cookie says which site fired and
 * how (see COOKIE_* below). An entry of an entry+return site stores its time, argument
 * registers and a few bytes of stack in a hash map keyed by (tid, site, frame); the
 * return finds it by the same key (its stack pointer is the entry's + 8, the return
 * address popped), so nested and recursive calls pair exactly, and writes one span
 * record into the ring buffer. Entry-only sites write an instant span at entry.
 *
 * User space is woken only when useful: on the urgent (anchor) probe's span, at most
 * once per wake gap (the `wake` map, set by the loader: at step rates above 1 / gap
 * the steps in between are read together, by the next wake-up or by user space's
 * follow-up read), or by the record that fills the ring past half; every other record
 * waits for the next drain.
 * Layouts here must match probes/bpf/session.py (RECORD, COOKIE_*, STAT_*).
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define STACK_BYTES 32
#define COOKIE_SITE_MASK 0xffffffffULL
#define COOKIE_URGENT (1ULL << 32)   /* wake the reader with this site's spans */
#define COOKIE_PAIRED (1ULL << 33)   /* entry+return site: entries wait for returns */
#define COOKIE_STACK (1ULL << 34)    /* read STACK_BYTES of user stack at entry */
#define COOKIE_RETURN (1ULL << 35)   /* this attachment is the return (uretprobe) */

/* x86-64 struct pt_regs, in 8-byte slots (arch/x86/include/asm/ptrace.h) */
#define R_R9 8
#define R_R8 9
#define R_AX 10
#define R_CX 11
#define R_DX 12
#define R_SI 13
#define R_DI 14
#define R_SP 19

enum { STAT_HITS, STAT_LOST, STAT_ORPHANS, STAT_OVERWRITTEN, STAT_COUNT };

struct pending_key {
	__u32 tid;
	__u32 site;
	__u64 frame;  /* entry's stack pointer + 8 == the return's stack pointer */
};

struct pending {
	__u64 start_ns;
	__u64 args[6];
	__u8 stack[STACK_BYTES];
};

struct span_record {
	__u32 site;
	__u32 tid;
	__u32 pid;
	__u32 flags;
	__u64 start_ns;
	__u64 end_ns;
	__u64 args[6];
	__u64 ret;
	__u8 stack[STACK_BYTES];
};

/* a record in the ring: an 8-byte header, then the span */
#define RECORD_BYTES (8 + sizeof(struct span_record))

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);  /* set by the loader from probe.ring_pages */
} spans SEC(".maps");

struct {
	/* calls in flight, every thread; abandoned entries (longjmp) age out. An LRU map
	 * is preallocated: 8192 entries is ~1.5 MB of kernel memory per session */
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct pending_key);
	__type(value, struct pending);
} entries SEC(".maps");

/* hits per site (entries and returns, as the kernel fired them) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} site_hits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* the urgent probe's wake-ups: WAKE_GAP_NS (set by the loader; 0: every urgent span
 * wakes the reader) and WAKE_LAST_NS, when the last one was forced */
enum { WAKE_GAP_NS, WAKE_LAST_NS, WAKE_COUNT };

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WAKE_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} wake SEC(".maps");

static __always_inline void count(void *map, __u32 key)
{
	__u64 *value = bpf_map_lookup_elem(map, &key);

	if (value)
		__sync_fetch_and_add(value, 1);
}

/* Wake the reader for an urgent span, or for the record that takes the unread data
 * past half the ring: once, not with every record after it (a reader that is late
 * would otherwise cost the target a wake-up per hit until it catches up). */
static __always_inline __u64 wake_flags(__u64 cookie, __u64 now)
{
	__u64 unread, half, *gap, *last;
	__u32 key;

	if (cookie & COOKIE_URGENT) {
		key = WAKE_GAP_NS;
		gap = bpf_map_lookup_elem(&wake, &key);
		key = WAKE_LAST_NS;
		last = bpf_map_lookup_elem(&wake, &key);
		if (!gap || !last || now - *last >= *gap) {
			if (last)
				*last = now;
			return BPF_RB_FORCE_WAKEUP;
		}
	}
	unread = bpf_ringbuf_query(&spans, BPF_RB_AVAIL_DATA);
	half = bpf_ringbuf_query(&spans, BPF_RB_RING_SIZE) / 2;
	if (unread >= half && unread < half + RECORD_BYTES)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

SEC("kprobe")
int on_hit(__u64 *regs)
{
	__u64 cookie = bpf_get_attach_cookie(regs);
	__u64 now = bpf_ktime_get_ns();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 site = cookie & COOKIE_SITE_MASK;
	struct pending_key key = {};
	struct span_record *rec;
	struct pending *entry;

	count(&site_hits, site);
	key.tid = (__u32)pid_tgid;
	key.site = site;
	if (cookie & COOKIE_RETURN) {
		key.frame = regs[R_SP];
		entry = bpf_map_lookup_elem(&entries, &key);
		if (!entry) {
			count(&stats, STAT_ORPHANS);
			return 0;
		}
		rec = bpf_ringbuf_reserve(&spans, sizeof(*rec), 0);
		if (!rec) {
			bpf_map_delete_elem(&entries, &key);
			count(&stats, STAT_LOST);
			return 0;
		}
		rec->start_ns = entry->start_ns;
		__builtin_memcpy(rec->args, entry->args, sizeof(rec->args));
		__builtin_memcpy(rec->stack, entry->stack, sizeof(rec->stack));
		bpf_map_delete_elem(&entries, &key);
		rec->site = site;
		rec->tid = key.tid;
		rec->pid = pid_tgid >> 32;
		rec->flags = 0;
		rec->end_ns = now;
		rec->ret = regs[R_AX];
		bpf_ringbuf_submit(rec, wake_flags(cookie, now));
		return 0;
	}
	if (cookie & COOKIE_PAIRED) {
		struct pending value = {};

		value.start_ns = now;
		value.args[0] = regs[R_DI];
		value.args[1] = regs[R_SI];
		value.args[2] = regs[R_DX];
		value.args[3] = regs[R_CX];
		value.args[4] = regs[R_R8];
		value.args[5] = regs[R_R9];
		if (cookie & COOKIE_STACK)
			bpf_probe_read_user(value.stack, sizeof(value.stack), (void *)regs[R_SP]);
		key.frame = regs[R_SP] + 8;
		if (bpf_map_lookup_elem(&entries, &key))  /* same frame again: the old one was abandoned */
			count(&stats, STAT_OVERWRITTEN);
		bpf_map_update_elem(&entries, &key, &value, BPF_ANY);
		return 0;
	}
	rec = bpf_ringbuf_reserve(&spans, sizeof(*rec), 0);
	if (!rec) {
		count(&stats, STAT_LOST);
		return 0;
	}
	rec->site = site;
	rec->tid = key.tid;
	rec->pid = pid_tgid >> 32;
	rec->flags = 0;
	rec->start_ns = now;
	rec->end_ns = now;
	rec->args[0] = regs[R_DI];
	rec->args[1] = regs[R_SI];
	rec->args[2] = regs[R_DX];
	rec->args[3] = regs[R_CX];
	rec->args[4] = regs[R_R8];
	rec->args[5] = regs[R_R9];
	rec->ret = 0;
	__builtin_memset(rec->stack, 0, sizeof(rec->stack));
	if (cookie & COOKIE_STACK)
		bpf_probe_read_user(rec->stack, sizeof(rec->stack), (void *)regs[R_SP]);
	bpf_ringbuf_submit(rec, wake_flags(cookie, now));
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
