//! UFS handles for mounts, fetched from the master by mount id on first use.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use strata_proto::masters::MasterSet;

use strata_proto::pb;
use strata_ufs::{Ufs, UfsError, UfsErrorKind, UfsUri};

pub struct Mounts {
    masters: Arc<MasterSet>,
    cache: Mutex<HashMap<u64, Ufs>>,
}

impl Mounts {
    pub fn new(masters: Arc<MasterSet>) -> Self {
        Mounts {
            masters,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn get(&self, id: u64) -> Result<Ufs, UfsError> {
        if let Some(u) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(u.clone());
        }
        let set = &self.masters;
        let m = set
            .call(false, |mut c| {
                let r = set.request(pb::MountIdRequest { id }, None);
                async move { c.get_mount(r).await }
            })
            .await
            .map_err(|e| {
                UfsError::new(
                    UfsErrorKind::Other,
                    format!("mount {id}"),
                    format!(
                        "cannot get the mount from the master at {}: {}",
                        e.addr,
                        e.status.message()
                    ),
                )
            })?;
        let opts: BTreeMap<String, String> = m.options.into_iter().collect();
        let uri = UfsUri::parse(&m.ufs_uri, &opts)?;
        let u = strata_ufs::open(&uri)?;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, u.clone());
        Ok(u)
    }
}
