//! Loading a configuration into the region: checks, stable slot assignment, slot
//! state and topology text, and the staging that keeps a reload nginx refuses from
//! going live.

use super::*;

impl Balancer {
    /// Load a new configuration: nodes whose (pool, id) remain keep their slot and
    /// everything learned; new nodes start in slow start; removed nodes stop being
    /// picked at once. All checks run before anything is changed.
    pub fn configure(&self, cfg: &Config) -> Result<(), Error> {
        self.check_capacity(cfg)?;
        let guard = self.region.lock(LOCK_TIMEOUT)?;
        let old = Topology::parse(&self.region.read_text(&guard));
        let cfg = crate::discovery::keep::carry_over(&self.region, &old, cfg);
        self.commit(&guard, &old, &cfg, 0)
    }

    /// [`Balancer::create`] for nginx's master at its first start: the config is live
    /// at once (no worker runs yet) as stage 1 (see [`Balancer::stage`]).
    pub fn create_staged(cfg: &Config) -> Result<(Balancer, u64), Error> {
        let b = Balancer::create(cfg)?;
        let h = b.region.header();
        // AcqRel, though the stage number is its own data (a count): nothing rides on it.
        let seq = h.stage_seq.fetch_add(1, Ordering::AcqRel) + 1;
        // Release pairs with the Acquire loads in `superseded`, `stage_is_live` and
        // `apply_stage`: the region `create` wrote is visible with the live stage.
        h.applied_stage.store(seq, Ordering::Release);
        b.stage.store(seq, Ordering::Relaxed);
        Ok((b, seq))
    }

    /// Check `cfg` against the running region as [`Balancer::configure`] would (every
    /// field, capacities, free slots, the text size) without changing anything, and
    /// number it: the stage that [`Balancer::apply_stage`] makes live later.
    ///
    /// Why: nginx runs `init_by_lua` in the master during a reload before it knows
    /// whether the reload succeeds (a `listen` on a busy port, a bad log path). A
    /// config applied there would be live in the old workers even when the reload is
    /// then refused. Staged, it goes live when the first new worker starts, and the
    /// old workers finish on the tables they began with.
    pub fn stage(&self, cfg: &Config) -> Result<u64, Error> {
        self.check_capacity(cfg)?;
        let guard = self.region.lock(LOCK_TIMEOUT)?;
        let old = Topology::parse(&self.region.read_text(&guard));
        self.plan(&old, cfg, clock::now_ms())?;
        drop(guard);
        // The workers forked after this inherit the values.
        self.secrets.remember(cfg);
        // AcqRel, though the stage number is its own data (a count): nothing rides on it.
        Ok(self.region.header().stage_seq.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// Make stage `seq` (numbered by [`Balancer::stage`] for `cfg`) live, unless it or
    /// a later stage already is; from now on this process serves stage `seq`. True
    /// when this call applied it (the first new worker), false when another had.
    pub fn apply_stage(&self, seq: u64, cfg: &Config) -> Result<bool, Error> {
        self.stage.store(seq, Ordering::Relaxed);
        self.secrets.remember(cfg);
        let guard = self.region.lock(LOCK_TIMEOUT)?;
        let applied = &self.region.header().applied_stage;
        // Acquire pairs with the Release below (a previous applier) and in
        // `create_staged`; the lock held here orders it after an applier anyway.
        if applied.load(Ordering::Acquire) >= seq {
            return Ok(false);
        }
        let old = Topology::parse(&self.region.read_text(&guard));
        let cfg = crate::discovery::keep::carry_over(&self.region, &old, cfg);
        self.commit(&guard, &old, &cfg, 0)?;
        // Release pairs with the Acquire in `superseded`: a process that sees the new
        // stage also sees the topology written above.
        applied.store(seq, Ordering::Release);
        Ok(true)
    }

    /// Is stage `seq` (or a later one) live?
    pub fn stage_is_live(&self, seq: u64) -> bool {
        // Acquire pairs with the Release in `apply_stage` / `create_staged`.
        self.region.header().applied_stage.load(Ordering::Acquire) >= seq
    }

    /// Has a later stage than this process's gone live? Then this process belongs to
    /// an nginx generation that is shutting down: it keeps the tables it has.
    pub fn superseded(&self) -> bool {
        let mine = self.stage.load(Ordering::Relaxed);
        // Acquire pairs with the Release in `apply_stage`: the later stage's topology
        // is visible once it is seen live.
        mine != 0 && self.region.header().applied_stage.load(Ordering::Acquire) > mine
    }

    /// The region's capacities are fixed: a config must ask for the same.
    pub(super) fn check_capacity(&self, cfg: &Config) -> Result<(), Error> {
        let cap = self.region.capacity();
        for (field, want, have) in [
            ("shm.max_nodes", cfg.shm.max_nodes, cap.max_nodes),
            ("shm.max_pools", cfg.shm.max_pools, cap.max_pools),
            ("shm.max_workers", cfg.shm.max_workers, cap.max_workers),
            ("shm.config_bytes", cfg.shm.config_bytes, cap.config_bytes),
            ("shm.queue_slots", cfg.shm.queue_slots, cap.max_waiters),
        ] {
            if want != have {
                return Err(Error::Config(ConfigError {
                    path: field.into(),
                    message: format!(
                        "{want} differs from the running region's {have}; capacities are fixed until nginx restarts"
                    ),
                }));
            }
        }
        Ok(())
    }

    /// Like [`Balancer::configure`], with the config built from the active topology
    /// under the same hold of the shared lock, so that concurrent run-time changes
    /// (`crate::admin`) never lose one another. Node flags in `keep` (besides `DOWN`)
    /// survive the change.
    pub(crate) fn reconfigure(
        &self,
        keep: u32,
        build: impl FnOnce(&Topology) -> Result<Config, Error>,
    ) -> Result<(), Error> {
        let guard = self.region.lock(LOCK_TIMEOUT)?;
        let old = Topology::parse(&self.region.read_text(&guard));
        let cfg = build(&old)?;
        self.commit(&guard, &old, &cfg, keep)
    }

    /// Assign slots, check the size, write slot state and the topology text, bump.
    pub(super) fn commit(
        &self,
        guard: &LockGuard<'_>,
        old: &Topology,
        cfg: &Config,
        keep: u32,
    ) -> Result<(), Error> {
        let now = clock::now_ms();
        let (new, text) = self.plan(old, cfg, now)?;
        self.apply(guard, old, &new, cfg, now, keep);
        self.region.write_text(guard, &text)?;
        self.secrets.remember(cfg);
        self.bump(guard);
        Ok(())
    }

    /// The new topology and its text, checked to fit, without touching the region.
    pub(super) fn plan(&self, old: &Topology, cfg: &Config, now: u64) -> Result<(Topology, Vec<u8>), Error> {
        let cap = self.region.capacity();
        let new = self.assign_slots(old, cfg, now)?;
        let text = serde_json::to_vec(&new).expect("topology serializes");
        if text.len() > cap.config_bytes as usize {
            return Err(Error::Config(ConfigError {
                path: "shm.config_bytes".into(),
                message: format!(
                    "{} is too small: this config needs {} bytes in shared memory",
                    cap.config_bytes,
                    text.len()
                ),
            }));
        }
        Ok((new, text))
    }

    /// Choose stable slots for the new topology, without touching the region.
    pub(super) fn assign_slots(&self, old: &Topology, cfg: &Config, now: u64) -> Result<Topology, Error> {
        let cap = self.region.capacity();
        let mut pool_taken = vec![false; cap.max_pools as usize];
        let mut node_taken = vec![false; cap.max_nodes as usize];
        let old_pool: HashMap<&str, &PoolTopo> = old.pools.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut keep_node: HashMap<(&str, &str), u32> = HashMap::new();
        for (name, pc) in &cfg.pools {
            if let Some(op) = old_pool.get(name.as_str()) {
                pool_taken[op.slot as usize] = true;
                // A set: a search of the list per old node is O(n²) (0.5 s at 10,000).
                let ids: std::collections::HashSet<&str> = pc.nodes.iter().map(|n| n.id.as_str()).collect();
                for on in &op.nodes {
                    if ids.contains(on.id.as_str()) {
                        node_taken[on.slot as usize] = true;
                        keep_node.insert((name.as_str(), on.id.as_str()), on.slot);
                    }
                }
            }
        }
        // Nodes of the old topology stay reserved (REMOVED) until their grace ends.
        let old_slots: std::collections::HashSet<u32> = old
            .pools
            .iter()
            .flat_map(|p| p.nodes.iter().map(|n| n.slot))
            .collect();
        let reusable = |i: u32| -> bool {
            let n = self.region.node(i).expect("in range");
            // Acquire pairs with the Release of REMOVED in `apply` (the `removed_ms`
            // read below was stored before it); the lock held here orders it too.
            let f = n.flags.load(Ordering::Acquire);
            if f & flags::REMOVED != 0 {
                // Acquire pairs with the Release in `shm::saturating_sub` (the report's
                // decrement); the report's writes after it are covered by the grace.
                return n.inflight.load(Ordering::Acquire) == 0
                    && now.saturating_sub(n.removed_ms.load(Ordering::Relaxed)) >= SLOT_REUSE_GRACE_MS;
            }
            // IN_USE but absent from the active topology: left by a writer that died.
            !old_slots.contains(&i)
        };
        let mut next_free = {
            let mut cursor = 0u32;
            move |taken: &mut Vec<bool>| -> Option<u32> {
                // Prefer never-used slots, then reusable removed ones.
                let fresh = (cursor..cap.max_nodes).find(|&i| {
                    !taken[i as usize]
                        && self
                            .region
                            .node(i)
                            .expect("in range")
                            .flags
                            // Acquire pairs with the flag stores in `apply` (and the lock
                            // held here): 0 is a slot never used.
                            .load(Ordering::Acquire)
                            == 0
                });
                let pick = fresh.or_else(|| (0..cap.max_nodes).find(|&i| !taken[i as usize] && reusable(i)));
                if let Some(i) = pick {
                    taken[i as usize] = true;
                    cursor = i;
                }
                pick
            }
        };
        let mut pools = Vec::new();
        for (name, pc) in &cfg.pools {
            let slot = match old_pool.get(name.as_str()) {
                Some(op) => op.slot,
                None => {
                    let i = (0..cap.max_pools)
                        .find(|&i| !pool_taken[i as usize])
                        .ok_or_else(|| {
                            Error::Config(ConfigError {
                                path: "shm.max_pools".into(),
                                message: format!("{} pool slots are all in use", cap.max_pools),
                            })
                        })?;
                    pool_taken[i as usize] = true;
                    i
                }
            };
            let mut nodes = Vec::new();
            for (k, nc) in pc.nodes.iter().enumerate() {
                let slot = match keep_node.get(&(name.as_str(), nc.id.as_str())) {
                    Some(&s) => s,
                    None => next_free(&mut node_taken).ok_or_else(|| {
                        Error::Config(ConfigError {
                            path: format!("pools.{name}.nodes[{k}]"),
                            message: format!(
                                "no free node slot: shm.max_nodes {} is exhausted (removed nodes free theirs {} s after their last request)",
                                cap.max_nodes,
                                SLOT_REUSE_GRACE_MS / 1000
                            ),
                        })
                    })?,
                };
                nodes.push(NodeTopo {
                    id: nc.id.clone(),
                    host: nc.host().to_string(),
                    addr: nc.resolved.ok_or_else(|| {
                        Error::Invalid(format!(
                            "pools.{name}.nodes[{k}].addr: not resolved (config not validated)"
                        ))
                    })?,
                    slot,
                    backup: nc.backup,
                    provider: nc.provider(),
                    tpm: nc.tpm,
                    rpm: nc.rpm,
                });
            }
            pools.push(PoolTopo {
                name: name.clone(),
                slot,
                policy: PoolConfig {
                    nodes: Vec::new(),
                    ..pc.clone()
                },
                nodes,
            });
        }
        Ok(Topology {
            pools,
            cluster: cfg.cluster.clone(),
        })
    }

    /// Write slot state for the new topology (lock held).
    pub(super) fn apply(
        &self,
        _g: &LockGuard<'_>,
        old: &Topology,
        new: &Topology,
        cfg: &Config,
        now: u64,
        keep: u32,
    ) {
        let r = &self.region;
        for p in &old.pools {
            if new.pool(&p.name).is_none() {
                r.pool(p.slot)
                    .expect("in range")
                    .in_use
                    // Release pairs with the Acquire loads of `in_use` (`live_pool`,
                    // `canary`, `force_emergency`); a 0 publishes nothing.
                    .store(0, Ordering::Release);
            }
            for n in &p.nodes {
                let gone = new
                    .pool(&p.name)
                    .is_none_or(|np| np.nodes.iter().all(|x| x.slot != n.slot));
                if gone {
                    let s = r.node(n.slot).expect("in range");
                    s.removed_ms.store(now, Ordering::Relaxed);
                    // Release pairs with the Acquire in `reusable`: `removed_ms` above.
                    s.flags.store(flags::REMOVED, Ordering::Release);
                }
            }
        }
        let old_slots: std::collections::HashSet<u32> = old
            .pools
            .iter()
            .flat_map(|p| p.nodes.iter().map(|n| n.slot))
            .collect();
        for p in &new.pools {
            let pc = &cfg.pools[&p.name];
            let ps = r.pool(p.slot).expect("in range");
            params::store_pool(r, old, new, p, now);
            // Release pairs with the Acquire loads in `live_pool`, `canary` and
            // `force_emergency`: the slot's parameters above are visible with it.
            ps.in_use.store(1, Ordering::Release);
            for (n, nc) in p.nodes.iter().zip(&pc.nodes) {
                let s = r.node(n.slot).expect("in range");
                if !old_slots.contains(&n.slot) {
                    node::reset(r, n.slot, now);
                }
                s.pool.store(p.slot, Ordering::Relaxed);
                s.weight.store(nc.weight, Ordering::Relaxed);
                // A cooldown learned under an older (or no) cap ends by this config's.
                let longest = p.policy.cooldown.max_ms.max(p.policy.cooldown.max_retry_after_ms) as u64;
                s.cooldown_until_ms.fetch_min(now + longest, Ordering::Relaxed);
                // ... and so does the slow start that would have followed it.
                s.started_ms.fetch_min(now + longest, Ordering::Relaxed);
                // Health (DOWN) is learned state and survives a reload; flags in `keep`
                // (DRAINING, for a run-time change) survive too.
                let down = s.flags.load(Ordering::Relaxed) & (flags::DOWN | flags::HEADROOM | keep);
                let (tpm, rpm) = (nc.tpm.unwrap_or(0), nc.rpm.unwrap_or(0));
                headroom::set_limits(s, tpm, rpm);
                let budget = if tpm | rpm != 0 { flags::BUDGET } else { 0 };
                let f = flags::IN_USE | down | budget | if n.backup { flags::BACKUP } else { 0 };
                // Release pairs with the Acquire in `live_node` (and `reusable`): the
                // node's pool, weight and reset state above are visible with IN_USE.
                s.flags.store(f, Ordering::Release);
            }
        }
    }

    pub(super) fn bump(&self, _g: &LockGuard<'_>) {
        // Release pairs with the Acquire in `sync` (and `generation`): slot and text
        // writes above are visible to a worker that sees the new generation.
        self.region.header().generation.fetch_add(1, Ordering::Release);
    }
}
