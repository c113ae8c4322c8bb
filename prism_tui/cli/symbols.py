"""``prism symbols``: each catalog probe's placement in a process, or why it does not
resolve.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from prism_tui.cli.common import target_args


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``symbols`` sub-command and its flags."""
    s = sub.add_parser("symbols", help="which catalog probes resolve in a process, and why not")
    target_args(s)
    s.add_argument("--profile", action="append",
                   help="profile name or TOML file (repeatable; default: every profile "
                        "with a library mapped in the target)")
    s.add_argument("--level", choices=("sentinel", "deepdive"), default="deepdive",
                   help="probe level to show (default: deepdive, i.e. all probes)")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    return s


def run(args: argparse.Namespace) -> int:
    """``prism symbols``: every probe decision of the chosen profiles on the target."""
    from probes.catalog import available_profiles, load_profile
    from probes.governor import calibrate
    from probes.placement import place_profile
    from probes.target import resolve_target

    [target] = resolve_target(args.pid, args.match)
    costs = calibrate()
    names = args.profile or sorted(available_profiles())
    files = target.mapped_files()
    report: list[dict[str, Any]] = []
    for name in names:
        profile = load_profile(name)
        mapped = [f.path for f in files for lib in profile.libraries if lib.matches(f.name)]
        if not args.profile and not mapped:
            continue
        placement = place_profile(target, profile, args.level)
        probes = []
        for d in placement.decisions:
            entry: dict[str, Any] = {
                "probe": d.probe, "stage": d.stage, "level": d.level, "status": d.status,
                "optional": d.optional, "reason": d.reason, "near": list(d.near),
                "sites": [{"library": s.library, "symbol": s.symbol,
                           "offset": s.offset, "function_offset": s.function_offset,
                           "skipped_endbr64": s.offset != s.function_offset,
                           "site": s.site, "ret": s.ret,
                           "est_cost_us_per_call": round(
                               costs.site_cost_ns(s.site, s.ret) / 1000, 2)}
                          for s in d.sites]}
            probes.append(entry)
        report.append({"profile": profile.name, "libraries": sorted(set(mapped)),
                       "probes": probes})
    doc: dict[str, Any] = {
        "target": {"pid": target.pid, "name": target.name, "exe": target.exe},
        "hit_cost_us": {"emulated": round(costs.emulated_ns / 1000, 2),
                        "single_step": round(costs.single_step_ns / 1000, 2),
                        "return": round(costs.return_ns / 1000, 2),
                        "wakeup": round(costs.wakeup_ns / 1000, 2),
                        "measured": costs.measured, "note": costs.note},
        "profiles": report}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"pid {target.pid} ({target.name}) {target.exe}")
    hc = doc["hit_cost_us"]
    print(f"probe hit cost measured here: {hc['emulated']} us emulated, "
          f"{hc['single_step']} us single-stepped, +{hc['return']} us per return probe")
    if not report:
        print("no catalog profile has a library mapped in this process "
              "(name one with --profile)")
    for prof in report:
        print(f"\nprofile {prof['profile']}: "
              f"{', '.join(prof['libraries']) or 'no library mapped'}")
        for pr in prof["probes"]:
            if pr["status"] == "resolved":
                for site in pr["sites"]:
                    where = f"{os.path.basename(site['library'])}+{site['offset']:#x}"
                    note = " (after endbr64)" if site["skipped_endbr64"] else ""
                    kind = "entry+return" if site["ret"] else "entry"
                    print(f"  ok      {pr['probe']:<22} {pr['stage']:<14} {site['symbol']} "
                          f"@ {where} {kind}, {site['site']}{note}, "
                          f"~{site['est_cost_us_per_call']:g} us/call")
            else:
                opt = " (optional)" if pr["optional"] else ""
                print(f"  {pr['status']:<7} {pr['probe']:<22} {pr['stage']:<14} "
                      f"{pr['reason']}{opt}")
    return 0
